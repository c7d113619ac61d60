//! `bitnet train`: quantization-aware training (or its full-precision twin) of a BitNet b1.58
//! model on text files.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bitnet_training::config::{ScheduleKind, TrainConfig};
use bitnet_training::train::{self, DataFiles, TrainOptions};

/// Arguments of `bitnet train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training text files (UTF-8).
    #[arg(long, num_args = 1.., required_unless_present_any = ["export_only", "evaluate", "resume", "print_config"])]
    pub data: Vec<PathBuf>,
    /// Held-out text files, only ever scored. Without it, the last `--data` file is held out
    /// when there are several.
    #[arg(long, num_args = 1..)]
    pub heldout: Vec<PathBuf>,
    /// A built-in configuration.
    #[arg(long, default_value = "default", value_parser = ["tiny", "default"])]
    pub preset: String,
    /// A JSON configuration (model and recipe), overriding `--preset`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Optimizer steps (overrides the configuration; the schedule stretches to fit).
    #[arg(long)]
    pub steps: Option<u64>,
    /// The run's folder.
    #[arg(long, default_value = "bitnet-run")]
    pub out: PathBuf,
    /// Continue the run in `--out` from its last checkpoint (with the data files it recorded,
    /// unless `--data` / `--heldout` name them elsewhere).
    #[arg(long)]
    pub resume: bool,
    /// Train the identical model without quantizers (the full-precision twin).
    #[arg(long)]
    pub full_precision: bool,
    /// Learning-rate schedule (overrides the configuration).
    #[arg(long, value_parser = ["two-stage", "cosine"])]
    pub schedule: Option<String>,
    /// Seed of initialisation and data order (overrides the configuration).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads, this one among them (default: one per physical core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stop after this many steps (checkpointed; `--resume` continues).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// No progress bar (a log line per validation goes to stderr instead).
    #[arg(long)]
    pub no_progress: bool,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Do not train: draw the finished run's loss plot and export it (HF folder and GGUF)
    /// again.
    #[arg(long)]
    pub export_only: bool,
    /// Do not train: score these text files with the finished run's model in `--out` (its
    /// own candle forward pass, windows of its training length) and print nats per byte.
    #[arg(long, num_args = 1..)]
    pub evaluate: Vec<PathBuf>,
}

/// Runs `bitnet train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    if a.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    // This thread, which walks candle's graph, is one of the workers: each fused operation's
    // parallel loops then start here and are shared out by work stealing, rather than handed
    // to the pool with this thread asleep until they finish (a wake-up per loop, hundreds a
    // step).
    let threads = bitnet_core::init_global_pool(a.threads.unwrap_or(0))?;
    // candle sizes its matmul parallelism from this variable; set before any work starts.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // candle allocates a fresh buffer per operation: keep freed memory in the heap instead of
    // unmapping it and faulting it in again (a fifth more tokens/s; see `heap`).
    bitnet_core::heap::keep_freed_memory();
    if a.export_only {
        return finish(&a.out);
    }
    if !a.evaluate.is_empty() {
        return evaluate(&a.out, &a.evaluate);
    }
    let saved = a.out.join("train_config.json");
    let mut cfg = if let Some(path) = &a.config {
        TrainConfig::from_file(path)?
    } else if a.resume && saved.is_file() {
        TrainConfig::from_file(&saved)?
    } else {
        TrainConfig::preset(&a.preset)?
    };
    if let Some(s) = a.steps {
        cfg.recipe.steps = s;
    }
    if a.full_precision {
        cfg.recipe.quantize = false;
    }
    if let Some(s) = &a.schedule {
        cfg.recipe.schedule = match s.as_str() {
            "cosine" => ScheduleKind::Cosine,
            _ => ScheduleKind::TwoStage,
        };
    }
    if let Some(seed) = a.seed {
        cfg.recipe.seed = seed;
    }
    cfg.validate()?;
    if a.print_config {
        outln!("{}", serde_json::to_string_pretty(&cfg)?)?;
        return Ok(());
    }
    let mut files = DataFiles {
        train: a.data.clone(),
        heldout: a.heldout.clone(),
    };
    // `--resume` alone continues with the files the run recorded (checked again by hash).
    let record = a.out.join("data.json");
    if a.resume && files.train.is_empty() && files.heldout.is_empty() && record.is_file() {
        let r: bitnet_training::train::DataRecord = bitnet_training::train::read_json(&record)?;
        files.train = r.train.into_iter().map(|f| f.path).collect();
        files.heldout = r.heldout.into_iter().map(|f| f.path).collect();
    }
    if files.heldout.is_empty() && files.train.len() > 1 {
        files.heldout.push(files.train.pop().expect("len > 1"));
    }
    eprintln!(
        "training {} model: {} parameters, {} steps x {} x {} tokens, {} training files, {} held out",
        if cfg.recipe.quantize { "a b1.58" } else { "a full-precision" },
        cfg.model.param_count(),
        cfg.recipe.steps,
        cfg.recipe.batch_size,
        cfg.recipe.seq_len,
        files.train.len(),
        files.heldout.len()
    );
    let opts = TrainOptions {
        out_dir: a.out.clone(),
        resume: a.resume,
        progress: !a.no_progress,
        stop_after: a.stop_after,
        log_every: 10,
    };
    let s = train::train(&cfg, &files, &opts)
        .with_context(|| format!("training in {}", a.out.display()))?;
    eprintln!(
        "{} steps, {} tokens, {:.0} tokens/s on {} threads; train loss {:.4}{}",
        s.steps,
        s.tokens,
        s.tokens_per_s,
        s.threads,
        s.train_loss,
        s.val_nats_per_byte
            .map_or(String::new(), |v| format!(", held-out {v:.4} nats/byte"))
    );
    if s.finished && cfg.recipe.quantize {
        // `train` has drawn the plot already; only the exports remain.
        export(&a.out)?;
    }
    Ok(())
}

/// `--export-only`: the loss plot, then (b1.58 runs) the exports.
fn finish(dir: &std::path::Path) -> anyhow::Result<()> {
    let cfg: TrainConfig = bitnet_training::train::read_json(&dir.join("train_config.json"))?;
    bitnet_training::train::plot_run(dir, &cfg, cfg.recipe.steps)
        .with_context(|| format!("plotting the run in {}", dir.display()))?;
    if !cfg.recipe.quantize {
        eprintln!(
            "plotted {}; a full-precision twin has no BitNet export",
            dir.display()
        );
        return Ok(());
    }
    export(dir)
}

fn export(dir: &std::path::Path) -> anyhow::Result<()> {
    let files = bitnet_training::export::export_run(dir)
        .with_context(|| format!("exporting the run in {}", dir.display()))?;
    eprintln!("exported {}", files.hf.display());
    for g in &files.gguf {
        eprintln!("exported {}", g.display());
    }
    Ok(())
}

fn evaluate(dir: &std::path::Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let run = bitnet_training::export::load_run(dir)
        .with_context(|| format!("loading the run in {}", dir.display()))?;
    let ctx = run.config.recipe.seq_len;
    let (mut nats, mut bytes) = (0f64, 0usize);
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let (npb, _) =
            bitnet_training::eval::nats_per_byte(&run.model, &run.tokenizer, &text, ctx)?;
        outln!("{}: {npb:.4} nats/byte ({} bytes)", f.display(), text.len())?;
        nats += npb * text.len() as f64;
        bytes += text.len();
    }
    outln!(
        "all: {:.4} nats/byte over {bytes} bytes ({} model, windows of {ctx} tokens)",
        nats / bytes.max(1) as f64,
        if run.config.recipe.quantize {
            "b1.58"
        } else {
            "full-precision"
        }
    )?;
    Ok(())
}
