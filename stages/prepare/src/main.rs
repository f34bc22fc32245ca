//! `prepare`: writes the built-in task's train and eval splits (prompts tables).
use clap::Parser;

/// Writes the built-in arithmetic task's train/eval splits for a run.
#[derive(Parser)]
#[command(name = "prepare", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
}

fn main() {
    l2t::cli::run_main("prepare", || {
        let args = Args::parse();
        println!("{}", l2t::pipeline::run_prepare(&args.common.ctx()?)?);
        Ok(())
    })
}
