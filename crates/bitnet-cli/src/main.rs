//! `bitnet`: run BitNet b1.58 models from the command line.

mod commands;

use std::path::PathBuf;

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
    /// Show a model's configuration and tensors.
    Inspect {
        /// A Hugging Face model folder or a GGUF file.
        path: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => commands::generate(a),
        Command::Logits(a) => commands::logits(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Inspect { path } => commands::inspect(&path),
    }
}
