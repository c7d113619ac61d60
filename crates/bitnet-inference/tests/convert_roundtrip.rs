//! HF packed -> our GGUF (TQ1_0, TQ2_0, I2_S) -> read back: same codes, scales rounded to the
//! target's precision, and the logits of the source with its scales rounded the same way.

mod common;

use bitnet_inference::convert::{convert_to_gguf, ConvertOptions, EmbeddingType, LinearType};
use bitnet_inference::formats::gguf::GgufFile;
use bitnet_inference::loader::{load, LoadOptions};
use bitnet_inference::model::{DenseFormat, GgufOptions, Layer, Model};
use bitnet_quant::i2s::I2sLayout;
use bitnet_quant::{BitLinear, WeightScale};
use common::*;
use half::f16;

/// The source model with each linear's step replaced by `round(step)`.
fn with_rounded_steps(src: &Model, round: impl Fn(f32) -> f32) -> Model {
    let re = |l: &BitLinear| {
        BitLinear::new(
            l.weight().clone(),
            WeightScale::Direct(round(l.scale().step())),
        )
    };
    let layers: Vec<Layer> = src.layers().iter().map(|l| l.map_linears(re)).collect();
    Model::new(
        src.config().clone(),
        src.embedding().clone(),
        None,
        src.final_norm().to_vec(),
        layers,
    )
    .unwrap()
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("bitnet-convert-{}-{name}", std::process::id()))
}

#[test]
fn packed_model_round_trips_through_every_ternary_gguf_type() {
    let src = load(&fixture("hf_packed"), &LoadOptions::default()).unwrap();
    let ids = prompt_ids();
    let cases = [
        (LinearType::Tq1_0, I2sLayout::X86),
        (LinearType::Tq2_0, I2sLayout::X86),
        (LinearType::I2S, I2sLayout::X86),
        (LinearType::I2S, I2sLayout::Arm),
    ];
    for (ty, layout) in cases {
        let path = tmp(&format!("{ty:?}-{layout:?}.gguf"));
        let opts = ConvertOptions {
            linear: ty,
            embedding: EmbeddingType::F32,
            i2s_layout: layout,
        };
        convert_to_gguf(&src, &opts, &path).unwrap();
        let back = load(&path, &LoadOptions::default()).unwrap();
        let round = |s: f32| match ty {
            LinearType::I2S => s,
            _ => f16::from_f32(s).to_f32(),
        };
        for (a, b) in src.model.layers().iter().zip(back.model.layers()) {
            for ((name, la), (_, lb)) in a.linears().into_iter().zip(b.linears()) {
                assert_eq!(
                    la.weight().to_codes(),
                    lb.weight().to_codes(),
                    "{ty:?} {name}"
                );
                assert_eq!(
                    lb.scale(),
                    WeightScale::Direct(round(la.scale().step())),
                    "{ty:?} {name}"
                );
            }
        }
        let want = logits_all(&with_rounded_steps(&src.model, round), &ids);
        let d = max_abs_diff(&logits_all(&back.model, &ids), &want);
        assert!(d <= 1e-4, "{ty:?} {layout:?}: max abs diff {d}");
        // The tokenizer travels inside the file.
        assert_eq!(
            back.tokenizer.encode("ternary weights", true).unwrap(),
            src.tokenizer.encode("ternary weights", true).unwrap()
        );
        std::fs::remove_file(&path).unwrap();
    }
}

/// A Q6_K embedding (llama.cpp's usual type for a tied one): written by our quantizer, read
/// back as exactly its decoded values, used for both the lookup and the head.
#[test]
fn q6_k_embedding_round_trips() {
    use bitnet_quant::q6_k::{dequantize_q6_k, quantize_q6_k};
    let src = load(&fixture("hf_packed"), &LoadOptions::default()).unwrap();
    let path = tmp("q6_k-embedding.gguf");
    let opts = ConvertOptions {
        linear: LinearType::Tq2_0,
        embedding: EmbeddingType::Q6_K,
        i2s_layout: I2sLayout::X86,
    };
    convert_to_gguf(&src, &opts, &path).unwrap();
    let back = load(&path, &LoadOptions::default()).unwrap();
    let (a, b) = (src.model.embedding(), back.model.embedding());
    assert_eq!(b.format(), DenseFormat::Q6_K);
    let (mut row, mut got) = (vec![0f32; a.cols()], vec![0f32; a.cols()]);
    let mut want = vec![0f32; a.cols()];
    for r in [0, 1, a.rows() / 2, a.rows() - 1] {
        a.row_to_f32(r, &mut row);
        dequantize_q6_k(&quantize_q6_k(&row).unwrap(), &mut want);
        b.row_to_f32(r, &mut got);
        assert_eq!(got, want, "row {r}");
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn i2s_layout_is_recorded_and_a_contradicting_choice_is_an_error() {
    let src = load(&fixture("hf_packed"), &LoadOptions::default()).unwrap();
    let path = tmp("layout.gguf");
    let opts = ConvertOptions {
        linear: LinearType::I2S,
        embedding: EmbeddingType::F16,
        i2s_layout: I2sLayout::Arm,
    };
    convert_to_gguf(&src, &opts, &path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.architecture(), Some("bitnet-b1.58"));
    let ask = |l| GgufOptions {
        i2s_layout: Some(l),
        ..Default::default()
    };
    let e = Model::from_gguf(&g, &ask(I2sLayout::X86))
        .unwrap_err()
        .to_string();
    assert!(e.contains("records I2_S layout Arm"), "{e}");
    assert!(Model::from_gguf(&g, &ask(I2sLayout::Arm)).is_ok());
    std::fs::remove_file(&path).unwrap();
}
