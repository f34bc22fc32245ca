//! `eval`: a policy of a run on a held-out split or a prompts file.
use anyhow::Result;
use clap::Parser;
use l2t::pipeline::{latest_policy, read_eval_summary, run_eval, EvalPolicy, EvalPrompts};
use std::path::PathBuf;

/// Evaluates a policy of the run (l2t-spec section 9): `eval.k` samples per prompt, pass@1,
/// unbiased pass@k, mean tokens (all / correct), format-valid rate, accuracy at the token budgets
/// `eval.budgets`, and token efficiency against the base policy (evaluated too, with the same
/// seeds, when the policy is not the base). Writes the eval_samples and eval_summary tables under
/// `runs/<run>/evals/<split>/<policy>/`.
#[derive(Parser)]
#[command(name = "eval", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// `base`, an iteration number (the policy that iteration's update produced), or `latest`.
    #[arg(long, default_value = "latest")]
    policy: String,
    /// A split of the built-in data: `eval` or `train`.
    #[arg(long, default_value = "eval", conflicts_with = "prompts")]
    split: String,
    /// A prompts file instead: Parquet in the prompts schema, or JSONL with prompt_id, prompt
    /// and gold_answer.
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[command(flatten)]
    shard: l2t::pipeline::ShardArgs,
}

fn main() {
    l2t::cli::run_main("eval", || -> Result<()> {
        let args = Args::parse();
        let ctx = l2t::pipeline::Ctx { part: args.shard.part()?, ..args.common.ctx()? };
        let target = if args.policy == "latest" { latest_policy(&ctx) } else { EvalPolicy::parse(&args.policy)? };
        let on = match args.prompts {
            Some(path) => EvalPrompts::File(path),
            None => EvalPrompts::Split(args.split),
        };
        let summaries = run_eval(&ctx, target, &on)?;
        summaries.iter().for_each(|s| println!("{s}"));
        if matches!(ctx.part, l2t::pipeline::Part::Shard(_)) {
            return Ok(()); // a shard's figures come with the merge
        }
        println!("eval: {}", read_eval_summary(&ctx, &on, target)?);
        Ok(())
    })
}
