//! HF checkpoint layouts beyond the fixtures: sharded safetensors and an untied head give the
//! same logits as the single-file, tied original.

mod common;

use std::path::{Path, PathBuf};

use bitnet_core::ScratchArena;
use bitnet_inference::model::{LogitsFor, Model, SeqStep};
use common::*;
use safetensors::tensor::TensorView;

type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn fixture_tensors() -> Tensors {
    let bytes = std::fs::read(fixture("hf_packed/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    ts
}

fn write(path: &Path, ts: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn folder(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture(&format!("hf_packed/{f}")), d.join(f)).unwrap();
    }
    d
}

fn logits(dir: &Path) -> Vec<f32> {
    let m = Model::from_hf_folder(dir).unwrap();
    let ids = prompt_ids();
    let mut cache = m.new_cache(ids.len()).unwrap();
    let mut out = vec![0.0; ids.len() * m.config().vocab_size];
    m.forward(
        &mut [SeqStep {
            tokens: &ids,
            cache: &mut cache,
            logits: LogitsFor::All,
        }],
        &mut ScratchArena::new(),
        &mut out,
    )
    .unwrap();
    out
}

#[test]
fn sharded_checkpoint_equals_the_single_file() {
    let want = logits(&fixture("hf_packed"));
    let d = folder("sharded");
    let ts = fixture_tensors();
    let (a, b) = ts.split_at(ts.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write(&d.join(names[0]), a);
    write(&d.join(names[1]), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.0.clone(), names[0].into()))
        .chain(b.iter().map(|t| (t.0.clone(), names[1].into())))
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(&d), want);

    // An index naming a tensor its shard lacks is an error that names the tensor.
    let mut bad = index.clone();
    bad["weight_map"]["model.ghost.weight"] = names[0].into();
    std::fs::write(d.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let e = Model::from_hf_folder(&d).unwrap_err().to_string();
    assert!(e.contains("model.ghost.weight"), "{e}");
    // A shard path escaping the folder is refused.
    let mut bad = index;
    bad["weight_map"]["model.norm.weight"] = "../model.safetensors".into();
    std::fs::write(d.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    assert!(Model::from_hf_folder(&d).is_err());
}

#[test]
fn untied_head_equal_to_the_embedding_gives_the_same_logits() {
    let want = logits(&fixture("hf_packed"));
    let d = folder("untied");
    let mut ts = fixture_tensors();
    let embed = ts
        .iter()
        .find(|t| t.0 == "model.embed_tokens.weight")
        .unwrap()
        .clone();
    ts.push(("lm_head.weight".into(), embed.1, embed.2, embed.3));
    write(&d.join("model.safetensors"), &ts);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let untied = cfg.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    assert_ne!(cfg, untied);
    std::fs::write(d.join("config.json"), &untied).unwrap();
    assert_eq!(logits(&d), want);
    // Untied without an lm_head is an error naming it.
    ts.pop();
    write(&d.join("model.safetensors"), &ts);
    let e = Model::from_hf_folder(&d).unwrap_err().to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
}
