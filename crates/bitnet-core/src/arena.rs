/// Working memory of a forward pass, reused from one call to the next.
///
/// A forward pass asks for all the buffers one step needs at once with [`ScratchArena::carve`];
/// they are cut from a few long vectors that only grow when a step needs more than any step
/// before it (a longer prompt, a bigger batch). After the first step of a given size the
/// decode loop allocates nothing; [`ScratchArena::growths`] counts the times it had to.
#[derive(Debug, Default)]
pub struct ScratchArena {
    f32s: Vec<f32>,
    i8s: Vec<i8>,
    i32s: Vec<i32>,
    growths: usize,
}

/// Cuts `buf` into consecutive disjoint slices of the given lengths, growing it first if needed.
fn carve_from<'a, T: Copy + Default, const N: usize>(
    buf: &'a mut Vec<T>,
    lens: [usize; N],
    growths: &mut usize,
) -> [&'a mut [T]; N] {
    let total: usize = lens.iter().sum();
    if buf.len() < total {
        *growths += 1;
        buf.resize(total, T::default());
    }
    let mut rest: &'a mut [T] = &mut buf[..total];
    std::array::from_fn(|k| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(lens[k]);
        rest = tail;
        head
    })
}

impl ScratchArena {
    /// An empty arena; it sizes itself on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Disjoint f32 buffers of lengths `f`, i8 buffers of lengths `q` and i32 buffers of
    /// lengths `a`, valid until the next call. Their contents are whatever the previous step
    /// left: callers overwrite them.
    #[allow(clippy::type_complexity)]
    pub fn carve<const F: usize, const Q: usize, const A: usize>(
        &mut self,
        f: [usize; F],
        q: [usize; Q],
        a: [usize; A],
    ) -> ([&mut [f32]; F], [&mut [i8]; Q], [&mut [i32]; A]) {
        let x = carve_from(&mut self.f32s, f, &mut self.growths);
        let y = carve_from(&mut self.i8s, q, &mut self.growths);
        let z = carve_from(&mut self.i32s, a, &mut self.growths);
        (x, y, z)
    }

    /// How many times a carve had to enlarge the arena.
    pub fn growths(&self) -> usize {
        self.growths
    }

    /// Bytes held.
    pub fn capacity_bytes(&self) -> usize {
        self.f32s.len() * 4 + self.i8s.len() + self.i32s.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carve_gives_disjoint_buffers_and_reuses_memory() {
        let mut a = ScratchArena::new();
        {
            let ([x, y], [q], []) = a.carve([3, 5], [7], []);
            assert_eq!((x.len(), y.len(), q.len()), (3, 5, 7));
            x.fill(1.0);
            y.fill(2.0);
            q.fill(3);
            assert!(x.iter().all(|&v| v == 1.0));
        }
        assert_eq!(a.growths(), 2);
        let _ = a.carve([4, 4], [2], []);
        let _ = a.carve([1], [], []);
        assert_eq!(a.growths(), 2, "smaller requests must reuse the arena");
        let _ = a.carve([100], [], []);
        assert_eq!(a.growths(), 3);
    }
}
