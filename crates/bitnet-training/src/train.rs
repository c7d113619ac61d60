//! The training loop: data, model, AdamW, schedule, validation, checkpoints, logs.
//!
//! A run lives in one output folder:
//! `train_config.json`, `data.json` (every file of both splits with its SHA-256),
//! `tokenizer.json`, `checkpoint/` (latest resumable state), `log.csv` (one row per logged
//! step), `model.safetensors` (final latent f32 weights), `summary.json` and, once the run
//! finishes, `loss.png` (the loss curves, see [`crate::plot`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::checkpoint::{self, CheckpointMeta};
use crate::config::TrainConfig;
use crate::data::{self, CorpusFile, DataCursor, WindowSampler};
use crate::model::Transformer;
use crate::optim::AdamW;
use crate::{Result, TrainError};

/// The files of a run.
#[derive(Debug, Clone, Default)]
pub struct DataFiles {
    /// Text the model learns from (and the tokenizer is trained on).
    pub train: Vec<PathBuf>,
    /// Text only ever scored (validation).
    pub heldout: Vec<PathBuf>,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The run's folder.
    pub out_dir: PathBuf,
    /// Continue from `out_dir/checkpoint` instead of starting afresh.
    pub resume: bool,
    /// Draw a progress bar on the terminal (log lines go to stderr either way).
    pub progress: bool,
    /// Stop (after checkpointing) once this many steps are done, as if interrupted. For tests
    /// of resumption and for splitting a run.
    pub stop_after: Option<u64>,
    /// Log a CSV row every this many steps.
    pub log_every: u64,
}

/// The corpus of a run, as recorded in `data.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    /// Training files.
    pub train: Vec<CorpusFile>,
    /// Held-out files.
    pub heldout: Vec<CorpusFile>,
    /// Tokens in the training stream.
    pub train_tokens: usize,
    /// Tokens in the held-out stream.
    pub heldout_tokens: usize,
}

/// What a finished (or stopped) run reports; written as `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Parameters of the model.
    pub params: usize,
    /// Training tokens per second over this session's optimizer steps (no evaluation).
    pub tokens_per_s: f64,
    /// Median seconds per optimizer step of this session, leaving out its first
    /// [`WARMUP_STEPS`] steps when it ran more (first-touch allocation and cache warm-up), as
    /// the PyTorch reference of `scripts/bench_training_vs_torch.sh` measures its steps.
    #[serde(default)]
    pub step_seconds_median: f64,
    /// Threads candle was allowed.
    pub threads: usize,
    /// Mean training loss over the last logged interval (nats per token).
    pub train_loss: f64,
    /// Held-out loss at the end (nats per token), if there is held-out text.
    pub val_loss: Option<f64>,
    /// Held-out nats per byte at the end (loss times tokens per byte of the held-out text).
    pub val_nats_per_byte: Option<f64>,
    /// Whether the run reached its last step (false: stopped by `stop_after`).
    pub finished: bool,
}

/// Leading steps of a session that [`TrainSummary::step_seconds_median`] leaves out.
pub const WARMUP_STEPS: usize = 3;

/// The median of `times` past the first [`WARMUP_STEPS`] (all of them when there are no
/// more); 0 for none.
fn median_after_warmup(times: &mut [f64]) -> f64 {
    let skip = if times.len() > WARMUP_STEPS {
        WARMUP_STEPS
    } else {
        0
    };
    let rest = &mut times[skip..];
    if rest.is_empty() {
        return 0.0;
    }
    rest.sort_by(f64::total_cmp);
    let mid = rest.len() / 2;
    if rest.len() % 2 == 1 {
        rest[mid]
    } else {
        (rest[mid - 1] + rest[mid]) / 2.0
    }
}

/// One row of `log.csv`.
const CSV_HEADER: &str =
    "step,tokens,lr,weight_decay,train_loss,grad_norm,val_loss,val_nats_per_byte,train_seconds";

/// Trains (or resumes) a run; returns its summary.
pub fn train(cfg: &TrainConfig, files: &DataFiles, opts: &TrainOptions) -> Result<TrainSummary> {
    cfg.validate()?;
    let out = &opts.out_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let device = Device::Cpu;
    let ckpt_dir = out.join("checkpoint");

    // Corpus, recorded by hash; on resume it must be the same text.
    let (train_rec, train_texts) = read_all(&files.train)?;
    let (held_rec, held_texts) = read_all(&files.heldout)?;
    if train_rec.is_empty() {
        return Err(TrainError::Invalid("no training files given".into()));
    }
    let tok_path = out.join("tokenizer.json");
    let resuming = opts.resume && checkpoint::exists(&ckpt_dir);
    if opts.resume && !resuming {
        return Err(TrainError::Invalid(format!(
            "--resume: no checkpoint in {}",
            ckpt_dir.display()
        )));
    }
    let tokenizer = if resuming {
        let old: DataRecord = read_json(&out.join("data.json"))?;
        if !CorpusFile::same_texts(&old.train, &train_rec)
            || !CorpusFile::same_texts(&old.heldout, &held_rec)
        {
            return Err(TrainError::Invalid(
                "--resume: the data files differ from the run's data.json (number, order, size \
                 or SHA-256)"
                    .into(),
            ));
        }
        Tokenizer::from_file(&tok_path).map_err(|e| TrainError::Tokenizer(e.to_string()))?
    } else {
        let t = data::train_tokenizer(&files.train, cfg.model.vocab_size)?;
        t.save(&tok_path, false)
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        t
    };
    let train_stream = data::token_stream(&tokenizer, &train_texts)?;
    let held_stream = data::token_stream(&tokenizer, &held_texts)?;
    let held_bytes: usize = held_texts.iter().map(|t| t.len()).sum();
    let record = DataRecord {
        train: train_rec,
        heldout: held_rec,
        train_tokens: train_stream.len(),
        heldout_tokens: held_stream.len(),
    };
    write_json(&out.join("data.json"), &record)?;

    // Model, optimizer, position.
    let r = &cfg.recipe;
    let (model, mut opt, mut meta) = if resuming {
        let (m, o, meta) = checkpoint::load(&ckpt_dir, &device)?;
        if &meta.config != cfg {
            return Err(TrainError::Invalid(
                "--resume: the configuration differs from the checkpoint's".into(),
            ));
        }
        // Refused before anything is written: a session without a step would overwrite the
        // run's summary with an empty one.
        if meta.step >= r.steps {
            return Err(TrainError::Invalid(format!(
                "--resume: the run in {} is finished ({} of {} steps); --export-only and \
                 --evaluate use it",
                out.display(),
                meta.step,
                r.steps
            )));
        }
        if let Some(s) = opts.stop_after.filter(|&s| s <= meta.step) {
            return Err(TrainError::Invalid(format!(
                "--stop-after {s}: the run in {} is at step {} already",
                out.display(),
                meta.step
            )));
        }
        (m, o, meta)
    } else {
        let m = Transformer::new(&cfg.model, r.quantize, r.seed, &device)?;
        let o = AdamW::new(m.named_params(), r.beta1, r.beta2, r.adam_eps)?;
        let meta = CheckpointMeta {
            step: 0,
            cursor: DataCursor { epoch: 0, index: 0 },
            tokens_seen: 0,
            train_seconds: 0.0,
            config: cfg.clone(),
        };
        (m, o, meta)
    };
    write_json(&out.join("train_config.json"), cfg)?;
    let mut sampler = WindowSampler::new(train_stream, r.seq_len, r.seed, meta.cursor)?;
    let val = data::eval_windows(&held_stream, r.seq_len, r.eval_windows);
    let tokens_per_byte = held_stream.len() as f64 / held_bytes.max(1) as f64;
    let mut csv = open_log(&out.join("log.csv"), meta.step)?;

    let threads = candle_core::utils::get_num_threads();
    let bar = progress_bar(opts.progress, r.steps, meta.step);
    let stop_at = opts.stop_after.map_or(r.steps, |s| s.min(r.steps));
    let step_tokens = (r.batch_size * r.seq_len) as u64;
    let (mut session_tokens, mut session_seconds) = (0u64, 0f64);
    let mut step_seconds = Vec::new();
    let (mut loss_acc, mut loss_n, mut last_loss) = (0f64, 0u64, f64::NAN);
    let mut last_val = None;
    while meta.step < stop_at {
        let t0 = Instant::now();
        let (lr, wd) = r.lr_wd(meta.step);
        let batch = sampler.next_batch(r.batch_size);
        let ids = Tensor::from_vec(batch, (r.batch_size, r.seq_len + 1), &device)?;
        let (loss, grads) = model.loss_and_grads(&ids)?;
        let gnorm = opt.step(&grads, lr, wd, r.grad_clip)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        let dt = t0.elapsed().as_secs_f64();
        session_seconds += dt;
        step_seconds.push(dt);
        session_tokens += step_tokens;
        meta.train_seconds += dt;
        meta.tokens_seen += step_tokens;
        meta.step += 1;
        meta.cursor = sampler.cursor;
        loss_acc += loss_v;
        loss_n += 1;

        let last = meta.step == stop_at;
        let eval_now =
            !val.is_empty() && (last || (r.eval_every > 0 && meta.step % r.eval_every == 0));
        let val_loss = if eval_now {
            Some(eval_loss(&model, &val, r.seq_len, r.batch_size)?)
        } else {
            None
        };
        if let Some(v) = val_loss {
            last_val = Some(v);
        }
        if last || meta.step % opts.log_every.max(1) == 0 || val_loss.is_some() {
            last_loss = loss_acc / loss_n as f64;
            let vl = val_loss.map_or(String::new(), |v| format!("{v:.5}"));
            let vb = val_loss.map_or(String::new(), |v| format!("{:.5}", v * tokens_per_byte));
            writeln!(
                csv,
                "{},{},{lr:.6e},{wd},{last_loss:.5},{gnorm:.4},{vl},{vb},{:.1}",
                meta.step, meta.tokens_seen, meta.train_seconds
            )
            .map_err(|e| TrainError::io(&out.join("log.csv"), e))?;
            csv.flush()
                .map_err(|e| TrainError::io(&out.join("log.csv"), e))?;
            loss_acc = 0.0;
            loss_n = 0;
            let tps = session_tokens as f64 / session_seconds.max(1e-9);
            bar.set_message(format!(
                "loss {last_loss:.3}{} | {tps:.0} tok/s",
                last_val.map_or(String::new(), |v| format!(" | val {v:.3}"))
            ));
            if val_loss.is_some() && !opts.progress {
                eprintln!(
                    "step {}/{} loss {last_loss:.4} val {vl} ({vb} nats/byte) lr {lr:.2e} {tps:.0} tok/s",
                    meta.step, r.steps
                );
            }
        }
        bar.set_position(meta.step);
        if last || (r.checkpoint_every > 0 && meta.step % r.checkpoint_every == 0) {
            checkpoint::save(&ckpt_dir, &model, &opt, &meta)?;
        }
    }
    bar.finish_and_clear();

    let finished = meta.step >= r.steps;
    if finished {
        save_weights(&model, &out.join("model.safetensors"))?;
    }
    let summary = TrainSummary {
        steps: meta.step,
        tokens: meta.tokens_seen,
        params: cfg.model.param_count(),
        tokens_per_s: session_tokens as f64 / session_seconds.max(1e-9),
        step_seconds_median: median_after_warmup(&mut step_seconds),
        threads,
        train_loss: last_loss,
        val_loss: last_val,
        val_nats_per_byte: last_val.map(|v| v * tokens_per_byte),
        finished,
    };
    write_json(&out.join("summary.json"), &summary)?;
    if finished {
        // Last, so that a plot that cannot be drawn leaves every other output in place.
        plot_run(out, cfg, meta.step)?;
    }
    Ok(summary)
}

/// Draws `out/loss.png` from `out/log.csv`, titled with the run's name, kind and size.
pub fn plot_run(out: &Path, cfg: &TrainConfig, steps: u64) -> Result<()> {
    let kind = if cfg.recipe.quantize {
        "BitNet b1.58"
    } else {
        "full precision"
    };
    let mut title = format!(
        "{kind}, {:.2}M parameters, {steps} steps",
        cfg.model.param_count() as f64 / 1e6
    );
    if let Some(run) = out.file_name() {
        title = format!("{}: {title}", run.to_string_lossy());
    }
    crate::plot::write_loss_plot(&out.join("log.csv"), &out.join("loss.png"), &title)
}

/// Mean loss over held-out windows (`[n, seq_len + 1]` row-major), in batches.
pub fn eval_loss(
    model: &Transformer,
    windows: &[u32],
    seq_len: usize,
    batch: usize,
) -> Result<f64> {
    let w = seq_len + 1;
    let n = windows.len() / w;
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in windows.chunks(batch * w) {
        let rows = chunk.len() / w;
        let ids = Tensor::from_vec(chunk.to_vec(), (rows, w), model.device())?;
        let l = model.loss(&ids)?.detach().to_scalar::<f32>()? as f64;
        sum += l * rows as f64;
        count += rows;
    }
    debug_assert_eq!(count, n);
    Ok(sum / count.max(1) as f64)
}

/// Writes the latent f32 weights under their Hugging Face names.
pub fn save_weights(model: &Transformer, path: &Path) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> = model
        .named_params()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

fn read_all(paths: &[PathBuf]) -> Result<(Vec<CorpusFile>, Vec<String>)> {
    let mut recs = Vec::with_capacity(paths.len());
    let mut texts = Vec::with_capacity(paths.len());
    for p in paths {
        let (r, t) = CorpusFile::read(p)?;
        recs.push(r);
        texts.push(t);
    }
    Ok((recs, texts))
}

/// Opens `log.csv` for appending, keeping only the rows of steps up to `step` (the rows a
/// resumed run has already produced) and writing the header on a fresh run.
fn open_log(path: &Path, step: u64) -> Result<std::fs::File> {
    let mut keep = String::from(CSV_HEADER);
    keep.push('\n');
    if step > 0 {
        if let Ok(old) = std::fs::read_to_string(path) {
            for line in old.lines().skip(1) {
                let s: u64 = line
                    .split(',')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX);
                if s <= step {
                    keep.push_str(line);
                    keep.push('\n');
                }
            }
        }
    }
    std::fs::write(path, keep).map_err(|e| TrainError::io(path, e))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))
}

fn progress_bar(show: bool, steps: u64, at: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(steps),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}")
            .expect("valid template"),
    );
    bar.set_position(at);
    bar.reset_eta();
    bar
}

/// Reads a JSON file into `T`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes `v` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("serializable");
    std::fs::write(path, text + "\n").map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::median_after_warmup;

    #[test]
    fn the_step_median_leaves_out_the_warm_up_steps() {
        // The three slow leading steps are left out: the median of 1, 2, 4, 3.
        assert_eq!(
            median_after_warmup(&mut [9.0, 8.0, 7.0, 1.0, 4.0, 2.0, 3.0]),
            2.5
        );
        assert_eq!(median_after_warmup(&mut [9.0, 8.0, 7.0, 5.0]), 5.0);
        // A session of no more than three steps keeps them all.
        assert_eq!(median_after_warmup(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_after_warmup(&mut []), 0.0);
    }
}
