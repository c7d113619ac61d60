//! The `bitnet` binary end to end, against the tiny-bitnet references.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bitnet_inference::npy;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/tiny-bitnet"
    ))
    .join(rel)
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .output()
        .expect("the bitnet binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read(path).unwrap();
    let shape = a.shape.clone();
    (shape, a.into_f32().unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prompt_ids_arg() -> String {
    npy::read(&fixture("ref/prompt_ids.npy"))
        .unwrap()
        .into_i64()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs `bitnet logits` and returns the written array.
fn logits(model: &Path, extra: &[&str], dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let out = dir.join(name);
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = bitnet(&args);
    assert!(o.status.success(), "bitnet logits failed: {}", stderr(&o));
    read_f32(&out)
}

#[test]
fn logits_match_transformers_full_and_incremental() {
    let dir = scratch("logits");
    let ids = prompt_ids_arg();
    let (shape, want) = read_f32(&fixture("ref/logits_packed_f32.npy"));
    let model = fixture("hf_packed");
    for extra in [vec!["--ids", &ids], vec!["--ids", &ids, "--incremental"]] {
        let (s, got) = logits(&model, &extra, &dir, "l.npy");
        assert_eq!(s, shape);
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{extra:?}: max abs diff {d}");
    }
    // --prompt tokenizes the prompt text to the same ids (BOS first).
    let prompt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("ref/prompt.json")).unwrap())
            .unwrap();
    let (_, by_prompt) = logits(
        &model,
        &["--prompt", prompt["text"].as_str().unwrap()],
        &dir,
        "p.npy",
    );
    assert!(max_abs_diff(&by_prompt, &want) <= 1e-4);
}

#[test]
fn dense_weight_layout_gives_identical_logits() {
    let dir = scratch("layout");
    let ids = prompt_ids_arg();
    for model in [fixture("hf_packed"), fixture("gguf/tiny-bitnet-TQ2_0.gguf")] {
        let (_, two_bit) = logits(&model, &["--ids", &ids], &dir, "a.npy");
        let (_, dense) = logits(
            &model,
            &["--ids", &ids, "--weight-layout", "base3"],
            &dir,
            "b.npy",
        );
        assert!(two_bit
            .iter()
            .zip(&dense)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    let o = bitnet(&[
        "bench",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "-p",
        "4",
        "-n",
        "2",
        "--reps",
        "1",
        "--json",
        "--weight-layout",
        "base3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["weight_layout"], "base3");
    let o = bitnet(&[
        "bench",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "--weight-layout",
        "base4",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("weight layout"), "{}", stderr(&o));
}

#[test]
fn thread_counts_give_identical_logits() {
    let dir = scratch("threads");
    let ids = prompt_ids_arg();
    let model = fixture("hf_packed");
    let (_, one) = logits(&model, &["--ids", &ids, "--threads", "1"], &dir, "a.npy");
    let (_, three) = logits(&model, &["--ids", &ids, "--threads", "3"], &dir, "b.npy");
    assert!(one
        .iter()
        .zip(&three)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn perplexity_matches_the_reference() {
    let o = bitnet(&[
        "perplexity",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "--file",
        fixture("ref/ppl.txt").to_str().unwrap(),
        "--ctx",
        "64",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("ref/perplexity.json")).unwrap())
            .unwrap();
    assert_eq!(got["n_tokens_scored"], want["n_tokens_scored"]);
    let (g, w) = (
        got["mean_nll"].as_f64().unwrap(),
        want["mean_nll"].as_f64().unwrap(),
    );
    assert!(((g - w) / w).abs() <= 1e-4, "mean_nll {g} vs {w}");
    let bytes = std::fs::metadata(fixture("ref/ppl.txt")).unwrap().len() as f64;
    let nll_sum = want["nll_sum"].as_f64().unwrap();
    let npb = got["nats_per_byte"].as_f64().unwrap();
    assert!(((npb - nll_sum / bytes) / npb).abs() <= 1e-4);
    assert!((got["ppl"].as_f64().unwrap().ln() - g).abs() < 1e-9);
}

fn generate(seed: &str, threads: &str) -> Output {
    bitnet(&[
        "generate",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "--prompt",
        "The ternary weights",
        "--max-tokens",
        "24",
        // The random fixture model's logits span hundreds of nats: only a high temperature
        // makes its samples depend on the seed.
        "--temperature",
        "50",
        "--top-k",
        "0",
        "--top-p",
        "1",
        "--min-p",
        "0",
        "--seed",
        seed,
        "--threads",
        threads,
    ])
}

#[test]
fn same_seed_same_text_and_timings_on_stderr() {
    let a = generate("7", "1");
    let b = generate("7", "2");
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(!a.stdout.is_empty());
    assert_eq!(a.stdout, b.stdout, "same seed, same text");
    let c = generate("8", "1");
    assert_ne!(a.stdout, c.stdout, "another seed, another text");
    let e = stderr(&a);
    assert!(e.contains("loaded") && e.contains("tokens/s"), "{e}");
}

#[test]
fn inspect_lists_config_and_tensors() {
    let o = bitnet(&["inspect", fixture("hf_packed").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("hidden_size: 256"));
    assert!(s.contains("model.layers.0.self_attn.q_proj.weight"));
    assert!(s.contains("U8") && s.contains("[64, 256]"));
    let total: u64 = std::fs::metadata(fixture("hf_packed/model.safetensors"))
        .unwrap()
        .len();
    assert!(s.contains("total: 38 tensors"), "{s}");
    assert!(total > 562_716);
}

/// Copies hf_packed into a scratch folder so a test can break one file.
fn broken_copy(name: &str) -> PathBuf {
    let dir = scratch(name);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture(&format!("hf_packed/{f}")), dir.join(f)).unwrap();
    }
    dir
}

/// Rewrites the copy's safetensors with `edit` applied to its tensor list.
fn rewrite_tensors(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Runs `bitnet logits` on a broken model and returns its stderr, checking it failed cleanly.
fn fails_cleanly(model: &Path, ids: &str) -> String {
    let out = std::env::temp_dir().join(format!("bitnet-cli-{}-fail.npy", std::process::id()));
    let o = bitnet(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        ids,
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success(), "expected failure");
    assert!(!e.contains("panicked"), "panic: {e}");
    e
}

#[test]
fn bad_models_and_inputs_give_clear_errors() {
    // Missing model folder.
    let e = fails_cleanly(Path::new("/nonexistent/model"), "1");
    assert!(e.contains("/nonexistent/model"), "{e}");

    // Token id outside the vocabulary.
    let e = fails_cleanly(&fixture("hf_packed"), "1,512");
    assert!(e.contains("512") && e.contains("vocabulary"), "{e}");

    // Truncated safetensors.
    let d = broken_copy("truncated");
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    for cut in [4, 100, len / 2, len - 1] {
        let bytes = std::fs::read(fixture("hf_packed/model.safetensors")).unwrap();
        std::fs::write(&f, &bytes[..cut as usize]).unwrap();
        let e = fails_cleanly(&d, "1");
        assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
    }

    // A missing tensor, named.
    let d = broken_copy("missing");
    rewrite_tensors(&d, |ts| {
        ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
    });
    let e = fails_cleanly(&d, "1");
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    // A tensor of the wrong shape, named.
    let d = broken_copy("shape");
    rewrite_tensors(&d, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.2 = vec![128];
        t.3.truncate(256);
    });
    let e = fails_cleanly(&d, "1");
    assert!(
        e.contains("model.norm.weight") && e.contains("[128]"),
        "{e}"
    );

    // A tensor of the wrong dtype, named.
    let d = broken_copy("dtype");
    rewrite_tensors(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        t.1 = safetensors::Dtype::I8;
    });
    let e = fails_cleanly(&d, "1");
    assert!(e.contains("k_proj.weight") && e.contains("I8"), "{e}");

    // Inconsistent head counts.
    let d = broken_copy("heads");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    let e = fails_cleanly(&d, "1");
    assert!(e.contains("num_key_value_heads"), "{e}");

    // An unreadable tokenizer.
    let d = broken_copy("tokenizer");
    std::fs::write(d.join("tokenizer.json"), "{ not json").unwrap();
    let e = fails_cleanly(&d, "1");
    assert!(e.contains("tokenizer"), "{e}");
}

#[test]
fn gguf_logits_match_transformers_full_and_incremental() {
    let dir = scratch("gguf");
    let ids = prompt_ids_arg();
    let (_, want) = read_f32(&fixture("ref/logits_gguf_equiv_f32.npy"));
    for f in ["tiny-bitnet-TQ1_0.gguf", "tiny-bitnet-TQ2_0.gguf"] {
        let model = fixture(&format!("gguf/{f}"));
        for extra in [vec!["--ids", &ids], vec!["--ids", &ids, "--incremental"]] {
            let (_, got) = logits(&model, &extra, &dir, "g.npy");
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-4, "{f} {extra:?}: max abs diff {d}");
        }
    }
}

#[test]
fn convert_writes_a_gguf_that_inspect_and_logits_read() {
    let dir = scratch("convert");
    let out = dir.join("m.gguf");
    let o = bitnet(&[
        "convert",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--type",
        "tq2_0",
        "--embedding-type",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bitnet(&["inspect", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    for needle in [
        "general.architecture [string] = \"bitnet\"",
        "bitnet.hidden_activation",
        "tokenizer.ggml.merges",
        "blk.0.attn_q.weight",
        "TQ2_0",
        "offset=",
    ] {
        assert!(s.contains(needle), "missing {needle}: {s}");
    }
    // TQ2_0 rounds the bf16 scales to f16: close to, not equal to, the source's logits.
    let ids = prompt_ids_arg();
    let (_, got) = logits(&out, &["--ids", &ids], &dir, "c.npy");
    let (_, src) = read_f32(&fixture("ref/logits_packed_f32.npy"));
    let d = max_abs_diff(&got, &src);
    assert!(d < 1.0, "max abs diff {d}");
    let bad = bitnet(&[
        "convert",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--type",
        "q4_0",
    ]);
    assert!(!bad.status.success() && stderr(&bad).contains("q4_0"));
}

#[test]
fn corrupt_gguf_is_a_clear_error() {
    let dir = scratch("badgguf");
    let bytes = std::fs::read(fixture("gguf/tiny-bitnet-TQ2_0.gguf")).unwrap();
    let f = dir.join("cut.gguf");
    std::fs::write(&f, &bytes[..20_000]).unwrap();
    let e = fails_cleanly(&f, "1");
    assert!(e.contains("cut.gguf"), "{e}");
}

#[test]
fn bench_reports_rates_as_json() {
    let o = bitnet(&[
        "bench",
        "--model",
        fixture("gguf/tiny-bitnet-TQ2_0.gguf").to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "4",
        "--reps",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["pp_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["threads"], 1);
    // 14 TQ linears repacked to 2 bits per weight plus the f16 tied head (512 x 256).
    let ternary: u64 = 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256) / 4;
    assert_eq!(
        v["bytes_per_token"].as_u64().unwrap(),
        ternary + 512 * 256 * 2
    );
    assert!(v["kernels"].as_str().is_some_and(|k| !k.is_empty()));
    let o = bitnet(&[
        "bench",
        "--model",
        fixture("hf_packed").to_str().unwrap(),
        "-p",
        "0",
        "-n",
        "2",
        "--reps",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["pp_tokens_per_s"].is_null() && v["tg_tokens_per_s"].as_f64().is_some());
    // Generation after a prefix in the cache; a prefix past the model's context is an error.
    let tiny = fixture("gguf/tiny-bitnet-TQ2_0.gguf");
    let args = [
        "bench",
        "--model",
        tiny.to_str().unwrap(),
        "-p",
        "0",
        "-n",
        "2",
    ];
    let o = bitnet(&[&args[..], &["--tg-prefix", "40", "--reps", "1", "--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tg_prefix"], 40);
    assert!(v["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
    let o = bitnet(&[&args[..], &["--tg-prefix", "99999999999", "--reps", "1"]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("context"), "{}", stderr(&o));
}

/// Without `--model`, `generate` runs the built-in model (no file needed), deterministically
/// for a seed, and its text is words, not the random fixture's noise.
#[test]
fn generate_defaults_to_the_builtin_model() {
    let args = [
        "generate",
        "--prompt",
        "ACT I. SCENE I. London. The palace.",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--threads",
        "1",
    ];
    let a = bitnet(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(stderr(&a).contains("builtin"), "{}", stderr(&a));
    let text = String::from_utf8(a.stdout.clone()).unwrap();
    let letters = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
    assert!(
        letters * 2 > text.len(),
        "mostly letters expected: {text:?}"
    );
    assert_eq!(
        bitnet(&args).stdout,
        a.stdout,
        "greedy output is deterministic"
    );

    let i = bitnet(&["inspect", "builtin"]);
    assert!(i.status.success(), "{}", stderr(&i));
    let out = String::from_utf8_lossy(&i.stdout);
    assert!(out.contains("I2_S"), "{out}");
}

/// `inspect --cpu` names the kernel set the engine uses: the best one, the one
/// `BITNET_KERNELS` asks for, or the best one again with a word on an override it ignored.
#[test]
fn inspect_cpu_says_which_kernels_run() {
    let run = |env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
        c.args(["inspect", "--cpu"]).env_remove("BITNET_KERNELS");
        if let Some(v) = env {
            c.env("BITNET_KERNELS", v);
        }
        let o = c.output().expect("the bitnet binary runs");
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let out = run(None);
    let line = |out: &str, key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no `{key}` line in {out}"))
            .to_string()
    };
    let sets = line(&out, "kernel sets: ");
    let best = sets.split(' ').next_back().unwrap().to_string();
    assert!(sets.starts_with("scalar"), "{out}");
    assert_eq!(
        line(&out, "kernels: "),
        format!("{best} (the best this CPU runs)")
    );
    assert_eq!(
        line(&run(Some("scalar")), "kernels: "),
        "scalar (BITNET_KERNELS=scalar)"
    );
    let ignored = line(&run(Some("avx9000")), "kernels: ");
    assert!(
        ignored.starts_with(&format!("{best} (BITNET_KERNELS=\"avx9000\" names no set")),
        "{ignored}"
    );
    // Neither a model nor --cpu: a usage error, not a panic.
    let none = bitnet(&["inspect"]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("--cpu"), "{}", stderr(&none));
}

/// `train --resume` with no `--data` continues with the files the run recorded in
/// `data.json`, and a finished run is not resumed again.
#[test]
fn train_resume_alone_uses_the_recorded_files() {
    let dir = scratch("resume");
    let line = "The quick brown fox jumps over the lazy dog, and the dog sleeps on.\n";
    let (a, b) = (dir.join("a.txt"), dir.join("b.txt"));
    std::fs::write(&a, line.repeat(40)).unwrap();
    std::fs::write(&b, line.repeat(8)).unwrap();
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    let common = ["--out", out_s, "--no-progress", "--threads", "1"];
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut first = vec!["train", "--data", a_s, b_s, "--preset", "tiny"];
    first.extend(["--steps", "4", "--stop-after", "2"]);
    first.extend(common);
    let o = bitnet(&first);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p.join("summary.json")).unwrap()).unwrap()
    };
    assert_eq!(summary(&out)["steps"], 2);

    let mut again = vec!["train", "--resume"];
    again.extend(common);
    let o = bitnet(&again);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 training files, 1 held out"),
        "{}",
        stderr(&o)
    );
    let s = summary(&out);
    assert_eq!(
        (s["steps"].as_u64(), s["finished"].as_bool()),
        (Some(4), Some(true))
    );

    let o = bitnet(&again);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is finished (4 of 4 steps)"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Output into a pipe whose reader has gone (`| head`) ends the command quietly: no panic,
/// no error, success.
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    let generate = ["generate", "--prompt", "ACT I.", "--max-tokens", "64"];
    let print_config = ["train", "--preset", "tiny", "--print-config"];
    for args in [&generate[..], &print_config[..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(args)
            .args(["--threads", "1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("error"), "{args:?}: {}", stderr(&o));
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
}
