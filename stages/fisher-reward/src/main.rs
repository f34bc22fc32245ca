//! `fisher-reward`: J, dI and the compression penalty C of every episode of one iteration.
use clap::Parser;

/// Scores every episode (l2t-spec sections 4-5): J before and after it (the policy's probability
/// of the gold answer if the reasoning stopped there), dI, and the Fisher penalty C along the
/// low-rank update direction of the proxy MLP block, raw and batch-median scaled.
#[derive(Parser)]
#[command(name = "fisher-reward", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// Iteration number (from 0).
    #[arg(long)]
    iter: u32,
    #[command(flatten)]
    shard: l2t::pipeline::ShardArgs,
}

fn main() {
    l2t::cli::run_main("fisher-reward", || {
        let args = Args::parse();
        let ctx = l2t::pipeline::Ctx { part: args.shard.part()?, ..args.common.ctx()? };
        println!("{}", l2t::pipeline::run_fisher_reward(&ctx, args.iter)?);
        Ok(())
    })
}
