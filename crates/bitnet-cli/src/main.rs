//! `bitnet`: run BitNet b1.58 models from the command line.

/// `println!` that returns the write's error instead of panicking on it: with the output piped
/// into a reader that has stopped (`bitnet ... | head`), the error reaches `main`, which treats
/// a closed pipe as the reader's choice.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod commands;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Run BitNet b1.58 (ternary-weight) language models on the CPU.
#[derive(Parser)]
#[command(name = "bitnet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Thread options shared by the commands that run a model.
#[derive(Args, Clone, Copy)]
struct ThreadArgs {
    /// Worker threads (default: the number of physical cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt, streamed to stdout.
    Generate(commands::GenerateArgs),
    /// Write the logits of every prompt position to a NumPy .npy file.
    Logits(commands::LogitsArgs),
    /// Perplexity of a model on a text file.
    Perplexity(commands::PerplexityArgs),
    /// Write a random-weight model with the exact shapes of a public BitNet model.
    Synth(commands::SynthArgs),
    /// Measure prompt-processing and generation speed.
    Bench(commands::BenchArgs),
    /// Write a model as GGUF (TQ1_0, TQ2_0, I2_S or F16 linears).
    Convert(commands::ConvertArgs),
    /// Train a BitNet b1.58 model (or its full-precision twin) on text files.
    Train(train::TrainArgs),
    /// Show a model's configuration and tensors, or (`--cpu`) this CPU and its kernels.
    Inspect {
        /// A Hugging Face model folder, a GGUF file, or `builtin`.
        path: Option<PathBuf>,
        /// Show the CPU's SIMD features, the kernel sets it can run and the one chosen.
        #[arg(long)]
        cpu: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`bitnet inspect ... | head`) is the reader's choice, not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => commands::generate(a),
        Command::Logits(a) => commands::logits(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Convert(a) => commands::convert(a),
        Command::Bench(a) => commands::bench(a),
        Command::Train(a) => train::run(a),
        Command::Synth(a) => commands::synth(a),
        Command::Inspect { path, cpu } => {
            if !cpu && path.is_none() {
                anyhow::bail!(
                    "inspect what? give a model (a folder, a GGUF file or `builtin`) or --cpu"
                );
            }
            if cpu {
                commands::inspect_cpu()?;
            }
            path.map_or(Ok(()), |p| commands::inspect(&p))
        }
    }
}
