//! GGUF models against the transformers references.

mod common;

use bitnet_core::ScratchArena;
use bitnet_inference::formats::gguf::GgufFile;
use bitnet_inference::model::{GgufOptions, Model};
use bitnet_inference::model::{LogitsFor, SeqStep};
use bitnet_quant::WeightScale;
use common::*;

/// GGUF tensor names of the HF linears, in `Layer::linears` order.
const GGUF_LINEARS: [(&str, &str); 7] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

fn load(name: &str) -> Model {
    let g = GgufFile::open(fixture(&format!("gguf/{name}"))).unwrap();
    Model::from_gguf(&g, &GgufOptions::default()).unwrap()
}

#[test]
fn tq_logits_match_transformers_full_and_incremental() {
    let (_, want) = npy_f32("ref/logits_gguf_equiv_f32.npy");
    let ids = prompt_ids();
    for f in ["tiny-bitnet-TQ1_0.gguf", "tiny-bitnet-TQ2_0.gguf"] {
        let m = load(f);
        for inc in [false, true] {
            let d = max_abs_diff(
                &if inc {
                    logits_incremental(&m, &ids)
                } else {
                    logits_all(&m, &ids)
                },
                &want,
            );
            assert!(d <= 1e-4, "{f} incremental={inc}: max abs diff {d}");
        }
    }
}

#[test]
fn tq_codes_and_scales_equal_the_reference() {
    let codes = reference("ternary_codes.safetensors");
    for f in ["tiny-bitnet-TQ1_0.gguf", "tiny-bitnet-TQ2_0.gguf"] {
        let m = load(f);
        for (i, layer) in m.layers().iter().enumerate() {
            for ((_, hf), (_, lin)) in GGUF_LINEARS.iter().zip(layer.linears()) {
                let name = format!("model.layers.{i}.{hf}.weight");
                assert_eq!(
                    lin.weight().to_codes(),
                    ref_i8(&codes, &name),
                    "{f}: {name}"
                );
                let d = ref_f32(&codes, &format!("{name}.gguf_d_f32"))[0];
                assert_eq!(lin.scale(), WeightScale::Direct(d), "{f}: {name}");
            }
        }
    }
}

#[test]
fn ternary_valued_f32_gguf_keeps_the_exact_step() {
    let codes = reference("ternary_codes.safetensors");
    let m = load("tiny-bitnet-F32.gguf");
    for (i, layer) in m.layers().iter().enumerate() {
        for ((_, hf), (_, lin)) in GGUF_LINEARS.iter().zip(layer.linears()) {
            let name = format!("model.layers.{i}.{hf}.weight");
            assert_eq!(lin.weight().to_codes(), ref_i8(&codes, &name), "{name}");
            let inv = ref_f32(&codes, &format!("{name}.inv_absmean_f32"))[0];
            let WeightScale::Direct(a) = lin.scale() else {
                panic!("{name}: {:?}", lin.scale())
            };
            let ulps = (a.to_bits() as i64 - (1.0 / inv).to_bits() as i64).abs();
            assert!(ulps <= 4, "{name}: step {a} vs 1/{inv} ({ulps} ulp)");
        }
    }
}

#[test]
fn head_formats_change_logits_only_by_their_rounding() {
    let ids = prompt_ids();
    let base = load("tiny-bitnet-TQ2_0.gguf");
    let want = logits_all(&base, &ids);
    let v = base.config().vocab_size;
    // f16 -> f32 widens exactly: identical logits, twice the bytes.
    let mut wide = load("tiny-bitnet-TQ2_0.gguf");
    wide.set_head_format(bitnet_inference::model::DenseFormat::F32)
        .unwrap();
    assert_eq!(logits_all(&wide, &ids), want);
    assert_eq!(wide.head().bytes(), 2 * base.head().bytes());
    // Q8_0: 34 bytes per 32 values, logits within 1% of their range, same argmax.
    let mut q = load("tiny-bitnet-TQ2_0.gguf");
    q.set_head_format(bitnet_inference::model::DenseFormat::Q8_0)
        .unwrap();
    assert_eq!(q.head().bytes(), base.head().bytes() * 34 / 64);
    let got = logits_all(&q, &ids);
    let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_abs_diff(&got, &want) <= 0.01 * range);
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    for i in 0..ids.len() {
        assert_eq!(
            argmax(&got[i * v..(i + 1) * v]),
            argmax(&want[i * v..(i + 1) * v])
        );
    }
    // Q6_K: 210 bytes per 256 values; each weight within half a step of a 16-value group's
    // max / 32, about four times Q8_0's rounding, so logits within 4% of their range.
    let mut q6 = load("tiny-bitnet-TQ2_0.gguf");
    q6.set_head_format(bitnet_inference::model::DenseFormat::Q6_K)
        .unwrap();
    assert_eq!(q6.head().bytes(), base.head().bytes() * 210 / 512);
    let got6 = logits_all(&q6, &ids);
    let d6 = max_abs_diff(&got6, &want);
    assert!(d6 <= 0.04 * range, "{d6} of {range}");
    for i in 0..ids.len() {
        assert_eq!(
            argmax(&got6[i * v..(i + 1) * v]),
            argmax(&want[i * v..(i + 1) * v])
        );
    }
}

/// A file whose weights hold a NaN (here the final norm's, f32 in this file) gives an error
/// naming the position, not logits the sampler would quietly read as noise.
#[test]
fn a_nan_weight_is_an_error_not_noise() {
    let src = fixture("gguf/tiny-bitnet-TQ2_0.gguf");
    let range = {
        let g = GgufFile::open(&src).unwrap();
        let t = g.tensor("output_norm.weight").unwrap();
        assert_eq!(t.ggml_type.name(), "F32");
        t.data_range.clone()
    };
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[range.start + 4..range.start + 8].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = std::env::temp_dir().join(format!("bitnet-nan-{}.gguf", std::process::id()));
    std::fs::write(&bad, &bytes).unwrap();
    let m = Model::from_gguf(&GgufFile::open(&bad).unwrap(), &GgufOptions::default()).unwrap();
    std::fs::remove_file(&bad).unwrap();
    let ids = prompt_ids();
    let mut cache = m.new_cache(ids.len()).unwrap();
    let mut out = vec![0.0; m.config().vocab_size];
    let e = m
        .forward(
            &mut [SeqStep {
                tokens: &ids,
                cache: &mut cache,
                logits: LogitsFor::Last,
            }],
            &mut ScratchArena::new(),
            &mut out,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("of position {} is NaN", ids.len() - 1)),
        "{msg}"
    );
    // The control: the untouched file runs.
    assert!(logits_all(&load("tiny-bitnet-TQ2_0.gguf"), &ids)
        .iter()
        .all(|v| v.is_finite()));
}
