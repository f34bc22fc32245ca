//! `bootstrap`: trains the tiny base policy on the task's worked solutions (SFT).
use clap::Parser;

/// Trains the tiny base policy (tokenizer + Qwen2-shaped model) on worked solutions, then reports
/// format-valid rate, accuracy and redundant episodes on the eval split.
#[derive(Parser)]
#[command(name = "bootstrap", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
}

fn main() {
    l2t::cli::run_main("bootstrap", || {
        let args = Args::parse();
        let summary = l2t::pipeline::run_bootstrap(&args.common.ctx()?)?;
        println!("{summary}");
        println!("bootstrap: eval {}", summary.metrics["eval"]);
        Ok(())
    })
}
