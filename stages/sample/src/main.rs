//! `sample`: G rollouts per prompt of one iteration.
use clap::Parser;

/// Samples G rollouts for each prompt of an iteration with the iteration's policy
/// (l2t-spec section 1) and writes the prompts and rollouts tables.
#[derive(Parser)]
#[command(name = "sample", version)]
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
    l2t::cli::run_main("sample", || {
        let args = Args::parse();
        let ctx = l2t::pipeline::Ctx { part: args.shard.part()?, ..args.common.ctx()? };
        println!("{}", l2t::pipeline::run_sample(&ctx, args.iter)?);
        Ok(())
    })
}
