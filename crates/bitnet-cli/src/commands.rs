//! The subcommands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitnet_core::{init_global_pool, ScratchArena};
use bitnet_inference::config::Activation;
use bitnet_inference::convert::{convert_to_gguf, ConvertOptions, EmbeddingType, LinearType};
use bitnet_inference::generate::{generate as run_generation, GenerateOptions};
use bitnet_inference::kv_cache::KvType;
use bitnet_inference::loader::{self, LoadOptions, LoadedModel, ModelKind};
use bitnet_inference::model::{DenseFormat, GgufOptions, LogitsFor, SeqStep};
use bitnet_inference::sampler::SamplerConfig;
use bitnet_quant::i2s::I2sLayout;
use bitnet_quant::WeightLayout;
use clap::Args;

use crate::ThreadArgs;

/// Which model to load and how.
#[derive(Args)]
pub struct ModelArgs {
    /// A Hugging Face model folder or a GGUF file; `builtin` (the default) is the small model
    /// this project trained on Shakespeare and the King James Bible, built into the binary.
    #[arg(long, default_value = bitnet_inference::builtin::BUILTIN_NAME)]
    model: PathBuf,
    /// GGUF only: the FFN activation (relu2 or silu), overriding the file's
    /// `<arch>.hidden_activation` (default relu2).
    #[arg(long)]
    activation: Option<String>,
    /// GGUF only: the block layout of I2_S tensors, x86 or arm (default: what the file
    /// records, else x86; bitnet.cpp's files do not say). For `convert`: the layout written.
    #[arg(long)]
    i2s_layout: Option<String>,
    /// Re-encode the output head: f32, f16, bf16, q8_0 or q6_k (default: keep the file's).
    /// q8_0 halves the head's bytes per token against f16, q6_k takes 41%.
    #[arg(long)]
    head_type: Option<String>,
    /// How the ternary layers are kept in memory: 2bit (the default, the fastest kernels) or
    /// base3 (1.6 bits per weight: 20% fewer bytes per token for about twice the decoding
    /// work, a gain only where decoding waits on memory; same logits).
    #[arg(long, default_value = "2bit")]
    weight_layout: String,
    /// How the KV cache stores keys and values: f32 (exact, the default) or f16 (half the
    /// memory and of the bytes each generated token reads back at long contexts, like
    /// llama.cpp's default; keys and values rounded to f16).
    #[arg(long, default_value = "f32")]
    kv_type: String,
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        let parse = |v: &Option<String>| v.as_deref().map(str::to_string);
        Ok(LoadOptions {
            gguf: GgufOptions {
                activation: parse(&self.activation)
                    .map(|a| Activation::parse(&a))
                    .transpose()?,
                i2s_layout: parse(&self.i2s_layout)
                    .map(|l| I2sLayout::parse(&l))
                    .transpose()?,
            },
            head: parse(&self.head_type)
                .map(|h| DenseFormat::parse(&h))
                .transpose()?,
            weight_layout: WeightLayout::parse(&self.weight_layout)?,
        })
    }

    /// `--model builtin` (or none) names the built-in model; `./builtin` names a path.
    fn is_builtin(&self) -> bool {
        self.model.as_os_str() == bitnet_inference::builtin::BUILTIN_NAME
    }

    fn load(&self) -> Result<(LoadedModel, f64)> {
        let t = Instant::now();
        let opts = self.options()?;
        let kv_type = KvType::parse(&self.kv_type)?;
        let mut m = if self.is_builtin() {
            bitnet_inference::builtin::load_builtin(&opts).context("loading the built-in model")?
        } else {
            loader::load(&self.model, &opts)
                .with_context(|| format!("loading {}", self.model.display()))?
        };
        m.model.set_kv_type(kv_type);
        Ok((m, t.elapsed().as_secs_f64()))
    }
}

/// Arguments of `bitnet generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1: all).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty on tokens seen in the last 64 (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed: the same seed gives the same text.
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    #[command(flatten)]
    threads: ThreadArgs,
}

/// Arguments of `bitnet logits`.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["ids", "prompt"])))]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    /// A prompt to tokenize (BOS added as the tokenizer's template says).
    #[arg(long)]
    prompt: Option<String>,
    /// Output .npy file: float32 [tokens, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Feed one token at a time through the KV cache instead of one pass.
    #[arg(long)]
    incremental: bool,
    #[command(flatten)]
    threads: ThreadArgs,
}

/// Arguments of `bitnet perplexity`.
#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text file to score (its exact bytes, UTF-8).
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: ThreadArgs,
}

/// Sizes the process's worker pool; returns the thread count.
fn init_threads(t: ThreadArgs) -> Result<usize> {
    Ok(init_global_pool(t.threads)?)
}

/// `bitnet generate`.
pub fn generate(a: GenerateArgs) -> Result<()> {
    let threads = init_threads(a.threads)?;
    let (m, load_s) = a.model.load()?;
    eprintln!(
        "loaded {} in {:.2} s ({} threads, kernels: {})",
        a.model.model.display(),
        load_s,
        threads,
        m.model.kernels().name
    );
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repeat_penalty: a.repeat_penalty,
            seed: a.seed,
            ..SamplerConfig::default()
        },
        stop_at_eos: true,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let stats = run_generation(&m.model, &m.tokenizer, &a.prompt, &opts, |text| {
        match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
            Ok(()) => std::ops::ControlFlow::Continue(()),
            Err(e) => {
                write_err = Some(e);
                std::ops::ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_err {
        // Kept as an I/O error so that `main` recognizes a closed pipe.
        return Err(anyhow::Error::new(e).context("writing to stdout"));
    }
    writeln!(out).context("writing to stdout")?;
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.generation_tokens_per_s()
    );
    Ok(())
}

/// `bitnet logits`.
pub fn logits(a: LogitsArgs) -> Result<()> {
    init_threads(a.threads)?;
    let (m, _) = a.model.load()?;
    let ids = match (&a.ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(p)) => m.tokenizer.encode(p, true)?,
        (None, None) => bail!("give --ids or --prompt"),
    };
    if ids.is_empty() {
        bail!("no tokens to run");
    }
    let vocab = m.model.config().vocab_size;
    let mut logits = vec![0f32; ids.len() * vocab];
    {
        let mut cache = m.model.new_cache(ids.len())?;
        let mut scratch = ScratchArena::new();
        if a.incremental {
            for (i, id) in ids.iter().enumerate() {
                m.model.forward(
                    &mut [SeqStep {
                        tokens: std::slice::from_ref(id),
                        cache: &mut cache,
                        logits: LogitsFor::Last,
                    }],
                    &mut scratch,
                    &mut logits[i * vocab..(i + 1) * vocab],
                )?;
            }
        } else {
            m.model.forward(
                &mut [SeqStep {
                    tokens: &ids,
                    cache: &mut cache,
                    logits: LogitsFor::All,
                }],
                &mut scratch,
                &mut logits,
            )?;
        }
    }
    bitnet_inference::npy::write_f32(&a.out, &[ids.len(), vocab], &logits)?;
    eprintln!(
        "wrote {} x {} logits to {}",
        ids.len(),
        vocab,
        a.out.display()
    );
    Ok(())
}

/// `bitnet perplexity`.
pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    init_threads(a.threads)?;
    let (m, _) = a.model.load()?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text", a.file.display()))?;
    let ids = m.tokenizer.encode(&text, true)?;
    let report = bitnet_inference::perplexity::perplexity(&m.model, &ids, a.ctx, text.len())?;
    if a.json {
        outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        outln!("tokens scored: {}", report.n_tokens_scored)?;
        outln!("windows: {} of {} tokens", report.windows, a.ctx)?;
        outln!("mean NLL: {:.6} nats", report.mean_nll)?;
        outln!("perplexity: {:.4}", report.ppl)?;
        outln!("nats per byte: {:.6}", report.nats_per_byte)?;
    }
    Ok(())
}

/// `bitnet inspect`.
/// `bitnet inspect --cpu`: the processor, its SIMD features, the kernel sets it can run and
/// the one the engine uses (with what became of a `BITNET_KERNELS` override).
pub fn inspect_cpu() -> Result<()> {
    use bitnet_quant::kernels::Kernels;
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(
        o,
        "cpu: {} ({} physical cores, {logical} logical)",
        bitnet_core::cpu_model_name().unwrap_or_else(|| "unknown".into()),
        bitnet_core::default_thread_count()
    )?;
    writeln!(o, "features: {}", bitnet_core::CpuFeatures::get())?;
    let sets: Vec<&str> = Kernels::available().iter().map(|k| k.name).collect();
    writeln!(o, "kernel sets: {}", sets.join(" "))?;
    let chosen = Kernels::get().name;
    let why = match std::env::var("BITNET_KERNELS") {
        Err(_) => "the best this CPU runs".to_string(),
        Ok(v) if Kernels::by_name(&v).is_some() => format!("BITNET_KERNELS={v}"),
        Ok(v) => format!("BITNET_KERNELS={v:?} names no set this CPU runs, so it is ignored"),
    };
    writeln!(o, "kernels: {chosen} ({why})")?;
    Ok(())
}

/// `bitnet inspect PATH`: a model's configuration and tensors.
pub fn inspect(path: &Path) -> Result<()> {
    if path.as_os_str() == bitnet_inference::builtin::BUILTIN_NAME {
        return inspect_gguf(path);
    }
    match loader::detect(path)? {
        ModelKind::HfFolder => inspect_hf(path),
        ModelKind::Gguf => inspect_gguf(path),
    }
}

fn inspect_hf(dir: &Path) -> Result<()> {
    use bitnet_inference::formats::safetensors::SafetensorsCheckpoint;
    let cfg_path = dir.join("config.json");
    let cfg = bitnet_inference::config::ModelConfig::from_hf_file(&cfg_path)?;
    let ckpt = SafetensorsCheckpoint::open_folder(dir)?;
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    writeln!(o, "model: {} (Hugging Face folder)", dir.display())?;
    writeln!(o, "config:")?;
    writeln!(o, "  hidden_size: {}", cfg.hidden_size)?;
    writeln!(o, "  intermediate_size: {}", cfg.intermediate_size)?;
    writeln!(o, "  layers: {}", cfg.num_layers)?;
    writeln!(
        o,
        "  heads: {} (kv heads {}, head_dim {})",
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    )?;
    writeln!(o, "  vocab_size: {}", cfg.vocab_size)?;
    writeln!(o, "  rms_norm_eps: {:e}", cfg.rms_norm_eps)?;
    writeln!(o, "  rope_theta: {}", cfg.rope_theta)?;
    writeln!(
        o,
        "  max_position_embeddings: {}",
        cfg.max_position_embeddings
    )?;
    writeln!(o, "  tie_word_embeddings: {}", cfg.tie_word_embeddings)?;
    writeln!(o, "  activation: {}", cfg.activation.name())?;
    writeln!(o, "  weights: {:?}", cfg.weight_format)?;
    writeln!(
        o,
        "  bos: {:?}, eos: {:?}",
        cfg.bos_token_id, cfg.eos_token_ids
    )?;
    writeln!(o, "tensors:")?;
    let mut total = 0usize;
    let mut count = 0usize;
    for t in ckpt.tensors() {
        let bytes = t.storage.len();
        total += bytes;
        count += 1;
        writeln!(
            o,
            "  {:<56} {:<5} {:<16} {:>12} bytes",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            bytes
        )?;
    }
    writeln!(
        o,
        "total: {count} tensors, {total} bytes ({:.2} MiB)",
        total as f64 / (1 << 20) as f64
    )?;
    Ok(())
}

fn inspect_gguf(path: &Path) -> Result<()> {
    use bitnet_inference::formats::gguf::GgufFile;
    let g = if path.as_os_str() == bitnet_inference::builtin::BUILTIN_NAME {
        GgufFile::parse(bitnet_core::MappedFile::from_static(
            "<built-in model>",
            bitnet_inference::builtin::builtin_bytes(),
        ))?
    } else {
        GgufFile::open(path)?
    };
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    writeln!(
        o,
        "model: {} (GGUF v{}, alignment {}, data at byte {})",
        path.display(),
        g.version(),
        g.alignment(),
        g.data_offset()
    )?;
    writeln!(o, "metadata ({} keys):", g.metadata().len())?;
    for (key, value) in g.metadata() {
        writeln!(o, "  {key} [{}] = {value}", value.value_type())?;
    }
    writeln!(o, "tensors ({}):", g.tensors().len())?;
    let mut total = 0usize;
    for t in g.tensors() {
        let dims: Vec<u64> = t.dims.clone();
        total += t.n_bytes();
        writeln!(
            o,
            "  {:<40} {:<6} ne={:<16} offset={:<10} {:>12} bytes",
            t.name,
            t.ggml_type.name(),
            format!("{dims:?}"),
            t.offset,
            t.n_bytes()
        )?;
    }
    writeln!(
        o,
        "total: {} tensors, {total} bytes ({:.2} MiB)",
        g.tensors().len(),
        total as f64 / (1 << 20) as f64
    )?;
    Ok(())
}

/// Arguments of `bitnet convert`.
#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// Type of the ternary linears: tq1_0, tq2_0, i2_s or f16.
    #[arg(long = "type")]
    linear_type: String,
    /// Type of the embedding (and untied head): f16, q8_0, q6_k or f32.
    #[arg(long, default_value = "f16")]
    embedding_type: String,
}

/// `bitnet convert`.
pub fn convert(mut a: ConvertArgs) -> Result<()> {
    // Here --i2s-layout names the layout to write; a source I2_S file is read by its record.
    let out_layout = a.model.i2s_layout.take();
    let opts = ConvertOptions {
        linear: LinearType::parse(&a.linear_type)?,
        embedding: EmbeddingType::parse(&a.embedding_type)?,
        i2s_layout: out_layout
            .as_deref()
            .map(I2sLayout::parse)
            .transpose()?
            .unwrap_or_default(),
    };
    let (m, _) = a.model.load()?;
    convert_to_gguf(&m, &opts, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.2} MiB, linears {}, embedding {})",
        a.out.display(),
        bytes as f64 / (1 << 20) as f64,
        a.linear_type,
        a.embedding_type
    );
    Ok(())
}

/// Arguments of `bitnet bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens per prompt-processing run (0 skips it).
    #[arg(short = 'p', long = "prompt", default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens per generation run (0 skips it).
    #[arg(short = 'n', long = "gen", default_value_t = 64)]
    gen_tokens: usize,
    /// Tokens already in the cache when each generation run starts (filled by one untimed
    /// batch), to measure decoding at that context length.
    #[arg(long = "tg-prefix", default_value_t = 0)]
    tg_prefix: usize,
    /// Runs of each phase (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: ThreadArgs,
}

/// `bitnet bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    use bitnet_inference::bench::{run_bench, BenchConfig};
    init_threads(a.threads)?;
    let (m, load_s) = a.model.load()?;
    let r = run_bench(
        &m.model,
        &BenchConfig {
            prompt_tokens: a.prompt_tokens,
            gen_tokens: a.gen_tokens,
            tg_prefix: a.tg_prefix,
            reps: a.reps,
        },
    )?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["pp_tokens_per_s"] = r.pp.map(|x| x.median).into();
        v["tg_tokens_per_s"] = r.tg.map(|x| x.median).into();
        v["tg_bandwidth_gb_s"] = r.tg_bandwidth_gbs().into();
        v["load_s"] = load_s.into();
        outln!("{v}")?;
        return Ok(());
    }
    outln!(
        "model: {} (loaded in {load_s:.2} s)",
        a.model.model.display()
    )?;
    outln!(
        "threads: {}, kernels: {}, weights: {}, CPU features: {}",
        r.threads,
        r.kernels,
        r.weight_layout,
        r.cpu_features
    )?;
    if let Some(pp) = r.pp {
        outln!(
            "pp{:<5} {:>9.2} tokens/s (min {:.2}, max {:.2}, {} runs)",
            r.prompt_tokens,
            pp.median,
            pp.min,
            pp.max,
            r.reps
        )?;
    }
    if let Some(tg) = r.tg {
        let at = if r.tg_prefix > 0 {
            format!(" after {} tokens", r.tg_prefix)
        } else {
            String::new()
        };
        outln!(
            "tg{:<5} {:>9.2} tokens/s (min {:.2}, max {:.2}, {} runs){at}",
            r.gen_tokens,
            tg.median,
            tg.min,
            tg.max,
            r.reps
        )?;
    }
    outln!(
        "weights streamed per token: {:.1} MB{}",
        r.bytes_per_token as f64 / 1e6,
        r.tg_bandwidth_gbs()
            .map(|g| format!(" ({g:.2} GB/s at the median generation rate)"))
            .unwrap_or_default()
    )?;
    Ok(())
}

/// Arguments of `bitnet synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// A public shape (2b4t, 0.7b, 3b, 8b, tiny) or the path of a config.json / HF folder.
    #[arg(long)]
    shape: String,
    /// Output: a .gguf file, or a folder for hf-packed.
    #[arg(long)]
    out: PathBuf,
    /// tq2_0, tq1_0, i2_s, f16 (GGUF) or hf-packed.
    #[arg(long = "type", default_value = "tq2_0")]
    kind: String,
    /// Random seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `bitnet synth`.
pub fn synth(a: SynthArgs) -> Result<()> {
    use bitnet_inference::synth::{write_synth, SynthOutput, SynthSpec};
    let spec = SynthSpec::parse(&a.shape)?;
    let kind = SynthOutput::parse(&a.kind)?;
    let t = Instant::now();
    let counts = spec.param_counts();
    write_synth(&spec, a.seed, &a.out, kind)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} ({}: {:.2} B parameters, {}) in {:.1} s",
        a.out.display(),
        spec.name,
        counts.total() as f64 / 1e9,
        a.kind,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
