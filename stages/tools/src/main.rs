//! `l2t`: run-level helpers the Makefile calls (the stages themselves are separate binaries).
use clap::{Parser, Subcommand};
use l2t::store::Store;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "l2t", version, about = "Run-level helpers (next iteration, DuckDB views, garbage collection) and checkpoint tools (score)")]
struct Args {
    /// The artifact store.
    #[arg(long, default_value = "artifacts", global = true)]
    artifacts: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the iteration `make iterate` runs next.
    NextIter {
        #[arg(long, default_value = "default")]
        run: String,
    },
    /// Print the SQL that creates the DuckDB views over a run (`*` for all runs).
    Views {
        #[arg(long, default_value = "default")]
        run: String,
    },
    /// Delete store entries no run's refs point at.
    Gc,
    /// Print the per-token log-probs of a text under a checkpoint (a .gguf file or a Hugging Face
    /// directory, such as a run's `iter-NNNN/grpo-update`), as JSON.
    Score {
        #[arg(long)]
        model: PathBuf,
        /// The text to score (tokenized without special tokens added).
        #[arg(long, conflicts_with = "text_file")]
        text: Option<String>,
        #[arg(long)]
        text_file: Option<PathBuf>,
        /// Render the text as a user message through the checkpoint's chat template first.
        #[arg(long)]
        chat: bool,
        /// Alternatives listed at each position.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
    },
}

fn main() {
    l2t::cli::run_main("l2t", || {
        let args = Args::parse();
        let store = Store::new(args.artifacts);
        match args.command {
            Command::NextIter { run } => println!("{}", l2t::audit::next_iteration(&store, &run)),
            Command::Views { run } => println!("{}", l2t::audit::views_sql(&store, &run)),
            Command::Score { model, text, text_file, chat, top_k } => score(&model, text, text_file, chat, top_k)?,
            Command::Gc => {
                let (removed, bytes) = store.gc()?;
                println!("gc: removed {removed} unreferenced store entries, freed {:.1} MiB", bytes as f64 / (1 << 20) as f64);
            }
        }
        Ok(())
    })
}

fn score(model: &std::path::Path, text: Option<String>, text_file: Option<PathBuf>, chat: bool, top_k: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    use l2t::model::{self, chat as chat_template, score, tokenizer, Policy};
    let text = match (text, text_file) {
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("{}: cannot read", f.display()))?,
        (None, None) => anyhow::bail!("give --text or --text-file"),
    };
    let dev = candle_core::Device::Cpu;
    let policy = Policy::from_checkpoint(model::read_checkpoint(model, &dev)?, &dev)?;
    let text = if chat {
        let cfg = l2t::config::PromptConfig { template: "chat".into(), ..Default::default() };
        chat_template::prompt_text(policy.chat_template(), &cfg, &text, &policy.tokenizer_config)?
    } else {
        text
    };
    let ids = tokenizer::encode(&policy.tokenizer, &text)?;
    let tokens = score::score_ids(&policy, &ids, top_k)?;
    let total: f64 = tokens.iter().filter_map(|t| t.logprob).map(f64::from).sum();
    let out = serde_json::json!({
        "model": model.display().to_string(),
        "text": text,
        "n_tokens": tokens.len(),
        "total_logprob": total,
        "tokens": tokens,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
