use std::fmt;
use std::sync::OnceLock;

/// The SIMD features of the CPU we run on, detected once at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// x86 AVX2.
    pub avx2: bool,
    /// x86 FMA3.
    pub fma: bool,
    /// x86 AVX-512 Foundation.
    pub avx512f: bool,
    /// x86 AVX-512 byte and word instructions.
    pub avx512bw: bool,
    /// x86 AVX-512 VNNI (int8 dot products).
    pub avx512vnni: bool,
    /// x86 AVX-VNNI (VEX-encoded int8 dot products).
    pub avxvnni: bool,
    /// aarch64 Advanced SIMD.
    pub neon: bool,
    /// aarch64 SDOT/UDOT.
    pub dotprod: bool,
}

impl CpuFeatures {
    /// The features of this machine (detected on first call, cached afterwards).
    pub fn get() -> CpuFeatures {
        static DETECTED: OnceLock<CpuFeatures> = OnceLock::new();
        *DETECTED.get_or_init(Self::detect)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect() -> CpuFeatures {
        CpuFeatures {
            avx2: std::arch::is_x86_feature_detected!("avx2"),
            fma: std::arch::is_x86_feature_detected!("fma"),
            avx512f: std::arch::is_x86_feature_detected!("avx512f"),
            avx512bw: std::arch::is_x86_feature_detected!("avx512bw"),
            avx512vnni: std::arch::is_x86_feature_detected!("avx512vnni"),
            avxvnni: std::arch::is_x86_feature_detected!("avxvnni"),
            ..Default::default()
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn detect() -> CpuFeatures {
        CpuFeatures {
            neon: std::arch::is_aarch64_feature_detected!("neon"),
            dotprod: std::arch::is_aarch64_feature_detected!("dotprod"),
            ..Default::default()
        }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn detect() -> CpuFeatures {
        CpuFeatures::default()
    }
}

/// The processor's name as `/proc/cpuinfo` gives it (`model name`, x86), when it does.
pub fn cpu_model_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "model name")
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("avx512f", self.avx512f),
            ("avx512bw", self.avx512bw),
            ("avx512vnni", self.avx512vnni),
            ("avxvnni", self.avxvnni),
            ("neon", self.neon),
            ("dotprod", self.dotprod),
        ];
        let on: Vec<&str> = names.iter().filter(|(_, v)| *v).map(|(n, _)| *n).collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(" "))
        }
    }
}
