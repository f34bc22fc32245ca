//! `segment`: episodes and outcome rewards of one iteration's rollouts.
use clap::Parser;

/// Cuts each rollout into episodes (l2t-spec section 2) and grades its final answer
/// (section 3), writing the episodes table.
#[derive(Parser)]
#[command(name = "segment", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// Iteration number (from 0).
    #[arg(long)]
    iter: u32,
    /// Print this many rollouts with their episode spans and rewards.
    #[arg(long, default_value_t = 0)]
    show: usize,
}

fn main() {
    l2t::cli::run_main("segment", || {
        let args = Args::parse();
        println!("{}", l2t::pipeline::run_segment(&args.common.ctx()?, args.iter, args.show)?);
        Ok(())
    })
}
