//! Synthetic models: shapes, determinism, the tokenizer, and the same model read back from
//! every format it is written as.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use bitnet_inference::formats::gguf_tokenizer::{gguf_tokenizer_metadata, tokenizer_from_metadata};
use bitnet_inference::loader::{load, LoadOptions, LoadedModel};
use bitnet_inference::synth::{
    synth_model, synth_tokenizer, synth_tokenizer_json, write_synth, ParamCounts, SynthOutput,
    SynthShape, SynthSpec, SYNTH_STEPS,
};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("bitnet-synth-{}-{name}", std::process::id()))
}

fn remove(p: &PathBuf) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

fn tiny() -> SynthSpec {
    SynthShape::Tiny.spec()
}

/// Same weights, scales, norms and embedding, and bit-identical logits.
fn assert_same_model(a: &LoadedModel, b: &LoadedModel, what: &str) {
    let (ma, mb) = (&a.model, &b.model);
    assert_eq!(ma.config().hidden_size, mb.config().hidden_size, "{what}");
    assert_eq!(ma.config().vocab_size, mb.config().vocab_size, "{what}");
    assert_eq!(ma.config().activation, mb.config().activation, "{what}");
    assert_eq!(ma.config().bos_token_id, mb.config().bos_token_id, "{what}");
    assert_eq!(
        ma.config().eos_token_ids,
        mb.config().eos_token_ids,
        "{what}"
    );
    for (i, (la, lb)) in ma.layers().iter().zip(mb.layers()).enumerate() {
        for ((name, x), (_, y)) in la.linears().into_iter().zip(lb.linears()) {
            assert_eq!(
                x.weight().to_codes(),
                y.weight().to_codes(),
                "{what}: layer {i} {name} codes"
            );
            assert_eq!(
                x.scale().step(),
                y.scale().step(),
                "{what}: layer {i} {name} step"
            );
        }
        assert_eq!(la.attn_norm, lb.attn_norm, "{what}: layer {i}");
        assert_eq!(la.attn_sub_norm, lb.attn_sub_norm, "{what}: layer {i}");
        assert_eq!(la.ffn_norm, lb.ffn_norm, "{what}: layer {i}");
        assert_eq!(la.ffn_sub_norm, lb.ffn_sub_norm, "{what}: layer {i}");
    }
    assert_eq!(ma.final_norm(), mb.final_norm(), "{what}");
    let (h, v) = (ma.config().hidden_size, ma.config().vocab_size);
    assert_eq!(
        ma.config().tie_word_embeddings,
        mb.config().tie_word_embeddings,
        "{what}"
    );
    let (mut ra, mut rb) = (vec![0f32; h], vec![0f32; h]);
    for r in [0, 1, 255, 300 % v, v - 1] {
        ma.embedding().row_to_f32(r, &mut ra);
        mb.embedding().row_to_f32(r, &mut rb);
        assert_eq!(ra, rb, "{what}: embedding row {r}");
        ma.head().row_to_f32(r, &mut ra);
        mb.head().row_to_f32(r, &mut rb);
        assert_eq!(ra, rb, "{what}: head row {r}");
    }
    let bos = ma.config().bos_token_id.unwrap();
    let ids = [bos, 5, 300 % v as u32, 17, 42, v as u32 - 1, 256];
    let (la, lb) = (common::logits_all(ma, &ids), common::logits_all(mb, &ids));
    assert!(la.iter().all(|x| x.is_finite()));
    let diff = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-4, "{what}: logits differ by {diff}");
    assert_eq!(la, lb, "{what}: logits are not bit-identical");
    // Same tokenizer.
    for text in ["Hello, world!", "naïve café 日本 🦀"] {
        assert_eq!(
            a.tokenizer.encode(text, true).unwrap(),
            b.tokenizer.encode(text, true).unwrap(),
            "{what}: {text}"
        );
    }
}

#[test]
fn tiny_reads_back_the_same_from_every_format() {
    let spec = tiny();
    let src = synth_model(&spec, 7).unwrap();
    for ty in ["tq2_0", "tq1_0", "i2_s", "hf-packed"] {
        let path = tmp(&format!("roundtrip-{ty}"));
        remove(&path);
        write_synth(&spec, 7, &path, SynthOutput::parse(ty).unwrap()).unwrap();
        let back = load(&path, &LoadOptions::default()).unwrap();
        remove(&path);
        assert_same_model(&src, &back, ty);
    }
}

/// Widths that are not whole 128-weight blocks, an untied head, SiLU, and special tokens at
/// the start of the vocabulary (as the 3b shape has, at a tiny size).
fn odd() -> SynthSpec {
    let mut spec = tiny();
    spec.name = "odd".into();
    let c = &mut spec.config;
    (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) = (192, 3, 1, 64);
    (c.intermediate_size, c.vocab_size) = (320, 300);
    c.tie_word_embeddings = false;
    c.activation = bitnet_inference::config::Activation::Silu;
    (c.bos_token_id, c.eos_token_ids) = (Some(1), vec![2]);
    spec.special_tokens = vec![(0, "<unk>".into()), (1, "<s>".into()), (2, "</s>".into())];
    spec
}

#[test]
fn odd_widths_and_untied_head_read_back_the_same() {
    let spec = odd();
    let src = synth_model(&spec, 11).unwrap();
    assert_eq!(src.tokenizer.id_to_token(3).as_deref(), Some("!"));
    assert_eq!(src.tokenizer.encode("a", true).unwrap()[0], 1);
    for ty in ["i2_s", "hf-packed", "f16"] {
        let path = tmp(&format!("odd-{ty}"));
        remove(&path);
        write_synth(&spec, 11, &path, SynthOutput::parse(ty).unwrap()).unwrap();
        let back = load(&path, &LoadOptions::default()).unwrap();
        remove(&path);
        assert_same_model(&src, &back, ty);
    }
    let e = write_synth(
        &spec,
        11,
        &tmp("odd.gguf"),
        SynthOutput::parse("tq2_0").unwrap(),
    );
    assert!(e.is_err());
}

#[test]
fn same_seed_gives_the_same_bytes() {
    let spec = tiny();
    let read = |seed: u64, ty: &str| {
        let path = tmp(&format!("det-{seed}-{ty}"));
        remove(&path);
        write_synth(&spec, seed, &path, SynthOutput::parse(ty).unwrap()).unwrap();
        let bytes = if path.is_dir() {
            ["model.safetensors", "config.json", "tokenizer.json"]
                .map(|f| std::fs::read(path.join(f)).unwrap())
                .concat()
        } else {
            std::fs::read(&path).unwrap()
        };
        remove(&path);
        bytes
    };
    for ty in ["tq2_0", "i2_s", "hf-packed"] {
        let a = read(1, ty);
        assert_eq!(a, read(1, ty), "{ty}");
        assert_ne!(a, read(2, ty), "{ty}");
    }
}

#[test]
fn tiny_weights_look_like_a_real_model() {
    let m = synth_model(&tiny(), 3).unwrap();
    let mut counts = [0usize; 3];
    let mut steps = std::collections::HashSet::new();
    for l in m.model.layers() {
        for (_, lin) in l.linears() {
            for c in lin.weight().to_codes() {
                counts[(c + 1) as usize] += 1;
            }
            steps.insert(lin.scale().step().to_bits());
            assert!(SYNTH_STEPS.contains(&lin.scale().step()));
        }
        for &w in l.attn_norm.iter().chain(&l.ffn_sub_norm) {
            assert!((0.93..=1.07).contains(&w), "{w}");
        }
    }
    let total: usize = counts.iter().sum();
    for c in counts {
        let share = c as f64 / total as f64;
        assert!((0.32..0.35).contains(&share), "{counts:?}");
    }
    assert!(steps.len() > 1, "every linear has the same step");
    let h = m.model.config().hidden_size;
    let mut row = vec![0f32; h];
    let (mut sum2, mut max) = (0f64, 0f32);
    for r in 0..m.model.config().vocab_size {
        m.model.embedding().row_to_f32(r, &mut row);
        for &x in &row {
            sum2 += f64::from(x * x);
            max = max.max(x.abs());
        }
    }
    let rms = (sum2 / (h * m.model.config().vocab_size) as f64).sqrt();
    assert!((0.015..0.025).contains(&rms), "embedding rms {rms}");
    assert!(max <= 0.05, "{max}");
    // A different seed changes the weights.
    let other = synth_model(&tiny(), 4).unwrap();
    assert_ne!(
        m.model.layers()[0].q.weight().to_codes(),
        other.model.layers()[0].q.weight().to_codes()
    );
    assert_eq!(
        ParamCounts::of_model(&m.model),
        tiny().param_counts(),
        "counted vs computed"
    );
}

#[test]
fn tokenizer_round_trips_text_and_gguf() {
    let tok = synth_tokenizer(&tiny()).unwrap();
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.id_to_token(510).as_deref(), Some("<|begin_of_text|>"));
    assert_eq!(tok.id_to_token(511).as_deref(), Some("<|end_of_text|>"));
    assert_eq!(tok.id_to_token(0).as_deref(), Some("!"));
    assert_eq!(tok.id_to_token(255).as_deref(), Some("Ń"));
    let texts = [
        "Hello, world! The quick brown fox jumps over the lazy dog 1234567.",
        "  indented\n\n\ttabs and\r\nCRLF  ",
        "naïve café — 日本語のテキスト 🦀🚀 Ελληνικά",
        "",
    ];
    let meta = gguf_tokenizer_metadata(&tok, Some(510), Some(511)).unwrap();
    let back = tokenizer_from_metadata(&meta).unwrap();
    assert_eq!(
        gguf_tokenizer_metadata(&back, Some(510), Some(511)).unwrap(),
        meta
    );
    for text in texts {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos[0], 510, "{text:?}");
        assert_eq!(&with_bos[1..], &ids[..]);
        assert_eq!(back.encode(text, true).unwrap(), with_bos, "{text:?}");
    }
    // Merged tokens are used: English text takes fewer tokens than bytes, even with only
    // 254 merges.
    let text = texts[0];
    assert!(tok.encode(text, false).unwrap().len() * 5 < text.len() * 4);
}

#[test]
fn large_vocabularies_put_special_tokens_where_the_real_models_have_them() {
    // Only the JSON (the vocabulary and merges), not the loaded tokenizer: fast in debug builds.
    let json = synth_tokenizer_json(&SynthShape::B2b4t.spec()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    assert_eq!(vocab.len(), 128256);
    assert_eq!(
        json["model"]["merges"].as_array().unwrap().len(),
        128000 - 256
    );
    assert_eq!(vocab["<|begin_of_text|>"], 128000);
    assert_eq!(vocab["<|end_of_text|>"], 128001);
    assert_eq!(vocab["<|eot_id|>"], 128009);
    assert_eq!(vocab["<|reserved_special_token_250|>"], 128255);
    assert_eq!(vocab["Ġthe"].as_u64().map(|id| id < 128000), Some(true));
    assert_eq!(json["added_tokens"].as_array().unwrap().len(), 256);
    let mut ids: Vec<u64> = vocab.values().map(|v| v.as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert!(ids.iter().copied().eq(0..128256));

    let json = synth_tokenizer_json(&SynthShape::Large0_7b.spec()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    assert_eq!(vocab.len(), 32002);
    assert_eq!(vocab["<s>"], 1);
    assert_eq!(vocab["</s>"], 2);
    assert_eq!(vocab["!"], 3);
}

#[test]
fn shapes_are_the_public_ones() {
    let c = SynthSpec::parse("2b4t").unwrap().config;
    assert_eq!(
        (
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (2560, 30, 20, 5, 128)
    );
    assert_eq!((c.intermediate_size, c.vocab_size), (6912, 128256));
    assert_eq!((c.rope_theta, c.rms_norm_eps), (500000.0, 1e-5));
    assert_eq!(c.max_position_embeddings, 4096);
    assert!(c.tie_word_embeddings);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(128000), vec![128001])
    );
    assert_eq!(c.activation.name(), "relu2");
    // About 2.41B parameters, the embedding included.
    assert_eq!(
        SynthShape::B2b4t.spec().param_counts().total(),
        2_412_820_480
    );

    let c = SynthSpec::parse("8b").unwrap().config;
    assert_eq!(
        (c.hidden_size, c.num_kv_heads, c.intermediate_size),
        (4096, 8, 14336)
    );
    assert!(!c.tie_word_embeddings);
    let c = SynthSpec::parse("3b").unwrap().config;
    assert_eq!(
        (c.hidden_size, c.head_dim, c.intermediate_size),
        (3200, 100, 8640)
    );
    let c = SynthSpec::parse("0.7b").unwrap().config;
    assert_eq!(
        (c.hidden_size, c.num_layers, c.vocab_size),
        (1536, 24, 32002)
    );
    for s in SynthShape::ALL {
        assert_eq!(SynthShape::parse(s.name()).unwrap(), s);
    }
    assert!(SynthSpec::parse("13b").is_err());
    // A Hugging Face config works as a custom shape.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/tiny-bitnet/hf_packed"
    );
    let custom = SynthSpec::parse(fixture).unwrap();
    assert_eq!(custom.config.hidden_size, 256);
    assert_eq!(custom.config.bos_token_id, Some(510));
}

#[test]
fn impossible_outputs_fail_before_generating() {
    let t = Instant::now();
    let path = tmp("3b.gguf");
    let e = write_synth(
        &SynthShape::B3b.spec(),
        0,
        &path,
        SynthOutput::parse("tq2_0").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("multiple of 256"), "{e}");
    assert!(t.elapsed().as_secs() < 5);
    assert!(!path.exists());
    assert!(SynthOutput::parse("q4_0").is_err());
}

/// Builds the full 2B-4T shape in memory. Run with
/// `cargo test --release -p bitnet-inference --test synth -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_2b4t_in_memory() {
    let spec = SynthShape::B2b4t.spec();
    let t = Instant::now();
    let m = synth_model(&spec, 0).unwrap();
    let built = t.elapsed();
    let counts = ParamCounts::of_model(&m.model);
    assert_eq!(counts, spec.param_counts());
    assert_eq!(counts.embedding, 128256 * 2560);
    assert_eq!(counts.head, 0);
    assert_eq!(
        counts.ternary,
        30 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560)
    );
    assert_eq!(counts.total(), 2_412_820_480);
    let l = &m.model.layers()[0];
    assert_eq!((l.k.out_features(), l.k.in_features()), (640, 2560));
    assert_eq!((l.down.out_features(), l.down.in_features()), (2560, 6912));
    assert_eq!(m.tokenizer.vocab_size(), 128256);
    let t = Instant::now();
    let ids = m.tokenizer.encode("The quick brown fox", true).unwrap();
    let out = common::logits_all(&m.model, &ids);
    assert!(out.iter().all(|x| x.is_finite()));
    eprintln!(
        "2b4t: built in {built:.2?} ({} params, {} MB of weights per token); \
         {} tokens forward in {:.2?}",
        counts.total(),
        m.model.weight_bytes_per_token() >> 20,
        ids.len(),
        t.elapsed()
    );
}

/// Writes the full 2B-4T shape as TQ2_0 GGUF and as an HF packed folder under the temp
/// folder (about 1.2 GB each, deleted afterwards), reads both back and compares them with the
/// model in memory. Run with
/// `cargo test --release -p bitnet-inference --test synth -- --ignored --nocapture`.
#[test]
#[ignore]
fn full_2b4t_files() {
    let spec = SynthShape::B2b4t.spec();
    let src = synth_model(&spec, 0).unwrap();
    let ids = [128000u32, 791, 4062];
    let want = common::logits_all(&src.model, &ids);
    for ty in ["tq2_0", "hf-packed"] {
        let path = tmp(&format!("2b4t-{ty}"));
        remove(&path);
        let t = Instant::now();
        write_synth(&spec, 0, &path, SynthOutput::parse(ty).unwrap()).unwrap();
        let written = t.elapsed();
        let size = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum()
        } else {
            std::fs::metadata(&path).unwrap().len()
        };
        let t = Instant::now();
        let back = load(&path, &LoadOptions::default());
        let loaded = t.elapsed();
        let got = back.map(|m| common::logits_all(&m.model, &ids));
        remove(&path);
        assert_eq!(got.unwrap(), want, "{ty}");
        eprintln!("2b4t {ty}: {size} bytes, written in {written:.2?}, loaded in {loaded:.2?}");
    }
}
