//! Loss curves of a run as a PNG: training loss at every row of `log.csv` and validation loss
//! at the rows that have one, against training tokens.
//!
//! Drawing uses `plotters` with its bitmap back-end only. Text goes through `ab_glyph`, which
//! needs a TrueType/OpenType file registered at run time; no font is bundled and no system font
//! library (fontconfig, freetype) is linked. [`plot_font`] takes the file named by the
//! environment variable [`FONT_ENV`], else the first of [`FONT_CANDIDATES`] that exists and
//! parses. **Without a font the plot is still written, with no text at all** (no title, tick
//! labels, axis names or legend): the curves, the grid and the axes only, the training curve
//! blue and the validation curve red.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::{Result, TrainError};

/// Environment variable naming a `.ttf` / `.otf` file to draw the plot's text with.
pub const FONT_ENV: &str = "BITNET_PLOT_FONT";

/// Where [`plot_font`] looks for a font when [`FONT_ENV`] is unset, in order: DejaVu Sans and
/// Liberation Sans as Debian / Ubuntu, Fedora and Arch install them, then macOS and Windows.
pub const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The font family the font is registered under and drawn with.
const FAMILY: &str = "sans-serif";

/// Size of the image in pixels.
pub const PLOT_SIZE: (u32, u32) = (900, 500);

/// Colour of the training curve.
pub const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
/// Colour of the validation curve.
pub const VAL_COLOR: RGBColor = RGBColor(214, 39, 40);

/// The two curves of a run, `(tokens, loss)` in log order; rows whose loss is not finite (a
/// diverged run logs `NaN`) are left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossCurves {
    /// Training loss, one point per row.
    pub train: Vec<(f64, f64)>,
    /// Validation loss, one point per row that has one.
    pub val: Vec<(f64, f64)>,
}

/// Reads the curves from a run's `log.csv` (columns found by their header names `tokens`,
/// `train_loss` and `val_loss`).
pub fn read_loss_csv(csv_path: &Path) -> Result<LossCurves> {
    let text = std::fs::read_to_string(csv_path).map_err(|e| TrainError::io(csv_path, e))?;
    let bad = |m: String| TrainError::Invalid(format!("{}: {m}", csv_path.display()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| bad("empty file, no header".into()))?
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| bad(format!("no column {name:?} in the header")))
    };
    let (c_tok, c_train, c_val) = (col("tokens")?, col("train_loss")?, col("val_loss")?);
    let mut curves = LossCurves::default();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |c: usize| -> Result<&str> {
            fields
                .get(c)
                .copied()
                .ok_or_else(|| bad(format!("row {} has {} fields", i + 2, fields.len())))
        };
        let num = |c: usize| -> Result<f64> {
            let s = field(c)?;
            s.parse::<f64>()
                .map_err(|_| bad(format!("row {}: {:?} is not a number", i + 2, s)))
        };
        let tokens = num(c_tok)?;
        let train = num(c_train)?;
        if tokens.is_finite() && train.is_finite() {
            curves.train.push((tokens, train));
        }
        if !field(c_val)?.is_empty() {
            let val = num(c_val)?;
            if tokens.is_finite() && val.is_finite() {
                curves.val.push((tokens, val));
            }
        }
    }
    Ok(curves)
}

/// The font the plot's text is drawn with, registered with `plotters` on the first call; `None`
/// when neither [`FONT_ENV`] nor any of [`FONT_CANDIDATES`] gives a readable font.
pub fn plot_font() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(|| {
        let from_env = std::env::var_os(FONT_ENV).map(PathBuf::from);
        let candidates = from_env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // plotters keeps registered fonts for the life of the process and wants them
            // 'static: leaked once (the OnceLock makes this run at most once).
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                return Some(path);
            }
        }
        None
    })
    .as_deref()
}

/// Draws the training and validation loss of `csv_path` (a run's `log.csv`) against tokens to
/// `png_path` (900 x 500), with `title`, axis names, tick labels and a legend when a font is
/// found ([`plot_font`]), and without any text otherwise.
pub fn write_loss_plot(csv_path: &Path, png_path: &Path, title: &str) -> Result<()> {
    let curves = read_loss_csv(csv_path)?;
    let text = plot_font().is_some();
    draw_loss_plot(&curves, png_path, title, text)
}

/// Draws `curves` to `png_path`; `text: false` draws no text at all (what
/// [`write_loss_plot`] does when there is no font).
pub fn draw_loss_plot(curves: &LossCurves, png_path: &Path, title: &str, text: bool) -> Result<()> {
    let fail = |m: String| TrainError::Invalid(format!("loss plot {}: {m}", png_path.display()));
    if curves.train.is_empty() && curves.val.is_empty() {
        return Err(fail("the log has no finite losses to draw".into()));
    }
    // plotters should report every failure as an error; a panic deep inside it (a font it
    // cannot lay out, say) must not take a finished training run down with it either.
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        render(curves, png_path, title, text)
    }));
    match drawn {
        Ok(r) => r.map_err(fail),
        Err(_) => Err(fail("plotters panicked while drawing".into())),
    }
}

/// `[lo, hi]` padded by 5% (a single value gets a unit-wide range).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = hi - lo;
    if span > 0.0 {
        (lo - 0.05 * span, hi + 0.05 * span)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

/// Token counts as `950`, `12.5k`, `3.2M`, `1.1B`.
fn format_tokens(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}B", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn render(
    curves: &LossCurves,
    png_path: &Path,
    title: &str,
    text: bool,
) -> std::result::Result<(), String> {
    let all = || curves.train.iter().chain(&curves.val);
    let (x0, x1) = padded_range(all().map(|p| p.0));
    let (mut y0, y1) = padded_range(all().map(|p| p.1));
    if all().all(|p| p.1 >= 0.0) {
        y0 = y0.max(0.0);
    }
    let x0 = x0.max(0.0);

    let root = BitMapBackend::new(png_path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder
            .caption(title, (FAMILY, 22))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    // Without text there are no label areas: plotters then draws no tick labels (and no axis
    // lines, which the frame below replaces) but still the grid.
    let mut chart = builder
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;

    let fmt_x = |v: &f64| format_tokens(*v);
    let fmt_y = |v: &f64| format!("{v:.2}");
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(200, 200, 200))
        .x_labels(10)
        .y_labels(8);
    if text {
        mesh.x_desc("training tokens")
            .y_desc("loss (nats / token)")
            .x_label_formatter(&fmt_x)
            .y_label_formatter(&fmt_y)
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16));
    }
    mesh.draw().map_err(|e| e.to_string())?;
    if !text {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, y0), (x1, y1)],
                RGBColor(140, 140, 140).stroke_width(1),
            )))
            .map_err(|e| e.to_string())?;
    }

    let series = [
        ("training loss", &curves.train, TRAIN_COLOR),
        ("validation loss", &curves.val, VAL_COLOR),
    ];
    for (name, points, color) in series {
        if points.is_empty() {
            continue;
        }
        let style = color.stroke_width(2);
        let drawn = chart
            .draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(|e| e.to_string())?;
        if text {
            drawn.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .label_font((FAMILY, 15))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str =
        "step,tokens,lr,weight_decay,train_loss,grad_norm,val_loss,val_nats_per_byte,train_seconds
1,512,3.0e-4,0.1,5.60000,1.2,,,0.1
2,1024,6.0e-4,0.1,5.10000,1.1,5.00000,1.40000,0.2
3,1536,9.0e-4,0.1,4.20000,1.0,,,0.3
4,2048,1.2e-3,0.1,3.50000,0.9,3.90000,1.10000,0.4
5,2560,1.5e-3,0.1,NaN,0.9,,,0.5
6,3072,1.5e-3,0.1,2.90000,0.8,3.40000,0.95000,0.6
";

    /// Decodes a PNG into (width, height, RGB rows).
    fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
        let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb, "plotters writes RGB");
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let px = buf[..info.buffer_size()]
            .chunks_exact(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        (info.width, info.height, px)
    }

    fn count(px: &[[u8; 3]], c: RGBColor) -> usize {
        px.iter().filter(|p| **p == [c.0, c.1, c.2]).count()
    }

    #[test]
    fn reads_the_log_columns() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("log.csv");
        std::fs::write(&csv, CSV).unwrap();
        let c = read_loss_csv(&csv).unwrap();
        // The NaN row is dropped from the training curve; val only where present.
        assert_eq!(
            c.train,
            [
                (512.0, 5.6),
                (1024.0, 5.1),
                (1536.0, 4.2),
                (2048.0, 3.5),
                (3072.0, 2.9)
            ]
        );
        assert_eq!(c.val, [(1024.0, 5.0), (2048.0, 3.9), (3072.0, 3.4)]);
        std::fs::write(&csv, "step,tokens\n1,2\n").unwrap();
        let e = read_loss_csv(&csv).unwrap_err().to_string();
        assert!(e.contains("train_loss"), "{e}");
    }

    #[test]
    fn draws_both_curves_and_text_to_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("log.csv");
        std::fs::write(&csv, CSV).unwrap();
        let png_path = dir.path().join("loss.png");
        write_loss_plot(&csv, &png_path, "tiny run").unwrap();
        let bytes = std::fs::read(&png_path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 2000, "{} bytes", bytes.len());
        let (w, h, px) = decode(&png_path);
        assert_eq!((w, h), PLOT_SIZE);
        // Not blank: mostly white background, and both curves in their colours (a few hundred
        // pixels each for lines 2 px wide across most of the width).
        let white = count(&px, WHITE);
        assert!(
            white > px.len() / 2 && white < px.len(),
            "{white} white of {}",
            px.len()
        );
        assert!(count(&px, TRAIN_COLOR) > 300, "{}", count(&px, TRAIN_COLOR));
        assert!(count(&px, VAL_COLOR) > 300, "{}", count(&px, VAL_COLOR));

        // With a font the title band at the top holds dark text; without text it is empty.
        // Dark pixels in the top 30 rows, away from the y axis at the left.
        let dark_in_title = |px: &[[u8; 3]]| {
            px[..(w * 30) as usize]
                .chunks_exact(w as usize)
                .flat_map(|row| &row[100..w as usize - 100])
                .filter(|p| p.iter().all(|&c| c < 100))
                .count()
        };
        if plot_font().is_some() {
            assert!(dark_in_title(&px) > 50, "no title drawn");
        }
        let bare = dir.path().join("bare.png");
        let curves = read_loss_csv(&csv).unwrap();
        draw_loss_plot(&curves, &bare, "tiny run", false).unwrap();
        let (_, _, px) = decode(&bare);
        assert_eq!(dark_in_title(&px), 0);
        assert!(count(&px, TRAIN_COLOR) > 300 && count(&px, VAL_COLOR) > 300);
    }

    #[test]
    fn failures_are_errors_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("log.csv");
        // Missing CSV.
        let e = write_loss_plot(&csv, &dir.path().join("a.png"), "t").unwrap_err();
        assert!(e.to_string().contains("log.csv"), "{e}");
        // Header only: nothing to draw.
        std::fs::write(&csv, CSV.lines().next().unwrap()).unwrap();
        let e = write_loss_plot(&csv, &dir.path().join("a.png"), "t").unwrap_err();
        assert!(e.to_string().contains("no finite losses"), "{e}");
        // Unwritable destination (a folder that does not exist).
        std::fs::write(&csv, CSV).unwrap();
        let png_path = dir.path().join("missing").join("a.png");
        let e = write_loss_plot(&csv, &png_path, "t").unwrap_err();
        assert!(e.to_string().contains("loss plot"), "{e}");
        assert!(e.to_string().contains("a.png"), "{e}");
    }
}
