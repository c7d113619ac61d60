//! `--resume` continues a run bit for bit, and refuses to continue with other data or another
//! configuration (the same texts in another folder are the same data).
//!
//! What makes `resume_equals_uninterrupted` fail: any state a checkpoint forgets or restores
//! wrongly (latent weights, AdamW moments or its step count used for bias correction, the data
//! cursor, the schedule position, the token count), a data order or initialisation that is not
//! a function of the seed, a tokenizer that comes out different when reloaded, or log rows
//! that a resumed run drops, duplicates or recomputes differently.

mod common;

use std::path::Path;

use bitnet_training::checkpoint::CheckpointMeta;
use bitnet_training::config::TrainConfig;
use bitnet_training::train::{train, DataFiles, TrainSummary};

/// Steps of the runs, where the interrupted one stops, validation and checkpoint periods.
const STEPS: u64 = 12;
const STOP: u64 = 6;
const EVERY: u64 = 4;

fn config() -> TrainConfig {
    let mut cfg = common::tiny(STEPS);
    cfg.recipe.eval_every = EVERY;
    cfg.recipe.checkpoint_every = EVERY;
    cfg.recipe.eval_windows = 4;
    // A short warm-up so that the schedule moves on both sides of the interruption
    // (warm-up, the first stage, the drop at the midpoint, the second stage).
    cfg.recipe.warmup_steps = 3;
    cfg
}

/// Training text and a different held-out text in `dir`.
fn corpus(dir: &Path) -> DataFiles {
    let held: String = common::SENTENCES
        .lines()
        .rev()
        .map(|l| format!("{l}\n"))
        .collect();
    DataFiles {
        train: vec![common::write(
            dir,
            "train.txt",
            &common::SENTENCES.repeat(3),
        )],
        heldout: vec![common::write(dir, "heldout.txt", &held)],
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(dir.path());
    let cfg = config();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));

    // A: uninterrupted.
    let sa = train(&cfg, &files, &common::options(&a, false, None, 1)).unwrap();
    // B: stopped after STOP steps (a checkpoint is written there, between the periodic ones),
    // then resumed to the end in a second call.
    let stopped = train(&cfg, &files, &common::options(&b, false, Some(STOP), 1)).unwrap();
    assert_eq!((stopped.steps, stopped.finished), (STOP, false));
    assert!(
        !b.join("model.safetensors").exists(),
        "a stopped run writes no final model"
    );
    let sb = train(&cfg, &files, &common::options(&b, true, None, 1)).unwrap();

    // Final weights, and the final checkpoint with the optimizer moments, bit for bit.
    for f in ["model.safetensors", "checkpoint/state.safetensors"] {
        let (fa, fb) = (read(&a.join(f)), read(&b.join(f)));
        assert!(fa.len() > 100_000, "{f}: {} bytes", fa.len());
        if fa != fb {
            // Name the first tensor that differs, for the failure message.
            let ta = candle_core::safetensors::load(a.join(f), &candle_core::Device::Cpu).unwrap();
            let tb = candle_core::safetensors::load(b.join(f), &candle_core::Device::Cpu).unwrap();
            let mut names: Vec<_> = ta.keys().collect();
            names.sort();
            for n in names {
                let flat =
                    |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                if tb.get(n).map(flat) != Some(flat(&ta[n])) {
                    panic!("{f}: tensor {n} differs after resuming");
                }
            }
            panic!("{f}: the files differ (but no tensor does)");
        }
    }

    // The summaries agree on everything but timing.
    let strip = |s: &TrainSummary| TrainSummary {
        tokens_per_s: 0.0,
        step_seconds_median: 0.0,
        ..s.clone()
    };
    assert_eq!(strip(&sa), strip(&sb));
    assert!(sa.finished && sa.steps == STEPS);

    // The logs: one row per step (log_every 1), equal in every column but the wall-clock
    // `train_seconds`. The one allowed difference: the interrupted session validated when it
    // stopped, so B's row at STOP has a validation loss A's lacks (same weights, so had A
    // validated there it would have logged the same value; it has no effect on training).
    let (ra, rb) = (common::log_rows(&a), common::log_rows(&b));
    assert_eq!(ra.len(), STEPS as usize);
    assert_eq!(rb.len(), STEPS as usize);
    let val_rows = ra.iter().filter(|r| !r[6].is_empty()).count();
    assert_eq!(
        val_rows,
        (STEPS / EVERY) as usize,
        "validation every {EVERY} steps"
    );
    for (x, y) in ra.iter().zip(&rb) {
        let step: u64 = x[0].parse().unwrap();
        if step == STOP {
            assert_eq!(x[..6], y[..6], "step {step}");
            assert!(
                x[6].is_empty() && !y[6].is_empty(),
                "step {step}: {x:?} {y:?}"
            );
        } else {
            assert_eq!(x[..8], y[..8], "step {step}");
        }
    }

    // The comparison can fail: the same interruption, but the checkpoint's data cursor moved
    // back by one window before resuming, ends with other weights.
    let c = dir.path().join("c");
    train(&cfg, &files, &common::options(&c, false, Some(STOP), 1)).unwrap();
    let meta_path = c.join("checkpoint/state.json");
    let mut meta: CheckpointMeta =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    assert!(meta.cursor.index > 0);
    meta.cursor.index -= 1;
    std::fs::write(&meta_path, serde_json::to_string(&meta).unwrap()).unwrap();
    train(&cfg, &files, &common::options(&c, true, None, 1)).unwrap();
    assert_ne!(
        read(&a.join("model.safetensors")),
        read(&c.join("model.safetensors"))
    );
}

#[test]
fn resume_refuses_other_data_or_config() {
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(dir.path());
    let mut cfg = config();
    cfg.recipe.steps = 3;
    let out = dir.path().join("run");
    let run = |cfg: &TrainConfig, resume: bool| {
        train(cfg, &files, &common::options(&out, resume, None, 1))
    };
    train(&cfg, &files, &common::options(&out, false, Some(1), 1)).unwrap();

    // Another configuration.
    let mut other = cfg.clone();
    other.recipe.lr *= 2.0;
    let e = run(&other, true).unwrap_err().to_string();
    assert!(e.contains("configuration differs"), "{e}");

    // The training text changed under the same path (one byte more).
    let text = std::fs::read_to_string(&files.train[0]).unwrap();
    std::fs::write(&files.train[0], format!("{text} ")).unwrap();
    let e = run(&cfg, true).unwrap_err().to_string();
    assert!(e.contains("data files differ"), "{e}");
    std::fs::write(&files.train[0], &text).unwrap();

    // The held-out text changed.
    let held = std::fs::read_to_string(&files.heldout[0]).unwrap();
    std::fs::write(&files.heldout[0], held.replace("fox", "cat")).unwrap();
    let e = run(&cfg, true).unwrap_err().to_string();
    assert!(e.contains("data files differ"), "{e}");
    std::fs::write(&files.heldout[0], &held).unwrap();

    // No checkpoint to resume from.
    let empty = dir.path().join("empty");
    let e = train(&cfg, &files, &common::options(&empty, true, None, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");

    // The same texts read from another folder: a moved corpus resumes.
    let moved_dir = dir.path().join("moved");
    std::fs::create_dir(&moved_dir).unwrap();
    let mv = |p: &Path| {
        let to = moved_dir.join(p.file_name().unwrap());
        std::fs::copy(p, &to).unwrap();
        to
    };
    let moved = DataFiles {
        train: files.train.iter().map(|p| mv(p)).collect(),
        heldout: files.heldout.iter().map(|p| mv(p)).collect(),
    };
    let s = train(&cfg, &moved, &common::options(&out, true, Some(2), 1)).unwrap();
    assert_eq!((s.steps, s.finished), (2, false));

    // The control: with the original data and configuration the same checkpoint resumes, so
    // the refusals above came from the changes and not from a broken checkpoint.
    let s = run(&cfg, true).unwrap();
    assert_eq!((s.steps, s.finished), (3, true));

    // A finished run is not resumed: its summary stays as the last session wrote it.
    let summary = read(&out.join("summary.json"));
    let e = run(&cfg, true).unwrap_err().to_string();
    assert!(e.contains("is finished (3 of 3 steps)"), "{e}");
    assert_eq!(read(&out.join("summary.json")), summary);
}

#[test]
fn resume_refuses_to_stop_before_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let files = corpus(dir.path());
    let mut cfg = config();
    cfg.recipe.steps = 4;
    let out = dir.path().join("run");
    train(&cfg, &files, &common::options(&out, false, Some(2), 1)).unwrap();
    let summary = read(&out.join("summary.json"));
    for stop in [1, 2] {
        let e = train(&cfg, &files, &common::options(&out, true, Some(stop), 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at step 2 already"), "{e}");
    }
    assert_eq!(read(&out.join("summary.json")), summary);
    let s = train(&cfg, &files, &common::options(&out, true, Some(3), 1)).unwrap();
    assert_eq!((s.steps, s.finished), (3, false));
}
