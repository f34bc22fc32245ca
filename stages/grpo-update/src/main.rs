//! `grpo-update`: the next policy from one iteration's rollouts and advantages.
use clap::Parser;

/// Clipped-surrogate policy update with a k3 KL to the base policy (l2t-spec section 8); writes
/// the next policy as a Hugging Face directory, the optimizer and trainer state that make
/// resuming exact, and the update_metrics table.
#[derive(Parser)]
#[command(name = "grpo-update", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// Iteration number (from 0).
    #[arg(long)]
    iter: u32,
}

fn main() {
    l2t::cli::run_main("grpo-update", || {
        let args = Args::parse();
        println!("{}", l2t::pipeline::run_grpo_update(&args.common.ctx()?, args.iter)?);
        Ok(())
    })
}
