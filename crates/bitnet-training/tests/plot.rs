//! The loss plot without a font: in this process no font is ever registered with plotters
//! (nothing here calls `plot::plot_font` or `plot::write_loss_plot`), so any text the drawing
//! tried to render would fail with plotters' `FontUnavailable` error. What `write_loss_plot`
//! does on a machine without fonts is exactly this call.

use bitnet_training::plot::{draw_loss_plot, LossCurves, PLOT_SIZE, TRAIN_COLOR, VAL_COLOR};

#[test]
fn plot_without_a_font_draws_no_text_and_does_not_fail() {
    let curves = LossCurves {
        train: (1..=50)
            .map(|i| (i as f64 * 512.0, 5.0 / (i as f64).sqrt()))
            .collect(),
        val: (1..=5)
            .map(|i| (i as f64 * 5120.0, 5.2 / (10.0 * i as f64).sqrt()))
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loss.png");
    draw_loss_plot(&curves, &path, "no font", false).unwrap();

    let dec = png::Decoder::new(std::fs::File::open(&path).unwrap());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), PLOT_SIZE);
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks_exact(3).collect();
    let count = |c: plotters::style::RGBColor| px.iter().filter(|p| **p == [c.0, c.1, c.2]).count();
    assert!(count(TRAIN_COLOR) > 300 && count(VAL_COLOR) > 300);

    // The premise holds: asking for text here fails (with an error, not a panic).
    let e = draw_loss_plot(&curves, &dir.path().join("text.png"), "t", true).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("loss plot") && e.contains("Font"), "{e}");
}
