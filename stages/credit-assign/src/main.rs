//! `credit-assign`: per-token advantages of one iteration's rollouts.
use clap::Parser;

/// Turns episode rewards R(i,k) = r_out/K + alpha (dI - beta C) into per-token advantages
/// (l2t-spec sections 6-7: surprise weights, token rewards, trimmed mean, group z-score, clip),
/// or plain GRPO advantages with `credit.method = "outcome"`.
#[derive(Parser)]
#[command(name = "credit-assign", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// Iteration number (from 0).
    #[arg(long)]
    iter: u32,
    /// Print this many rollouts with their episode rewards and advantages.
    #[arg(long, default_value_t = 0)]
    show: usize,
}

fn main() {
    l2t::cli::run_main("credit-assign", || {
        let args = Args::parse();
        println!("{}", l2t::pipeline::run_credit_assign(&args.common.ctx()?, args.iter, args.show)?);
        Ok(())
    })
}
