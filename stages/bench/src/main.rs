//! `bench`: sampling throughput of the tiny policy at batch 1 and 64, the supervised step time,
//! the run's bootstrap wall time, and the wall time of every stage of a tiny iteration (with
//! both `fisher-reward` estimators). One JSON line per workload; nothing is asserted.
use anyhow::Result;
use clap::Parser;
use l2t::model::{self, tokenizer, Policy};
use l2t::sample::{generate, Request, SamplerParams};
use l2t::train::sft::{self, SftParams};
use std::time::Instant;

/// Prints tiny-policy sampling throughput (batch 1 and 64), SFT step time, bootstrap wall time and
/// the time of each stage of a tiny iteration.
#[derive(Parser)]
#[command(name = "bench", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// Tokens generated per row (fixed length: end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed repetitions per workload; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the per-stage iteration timings.
    #[arg(long)]
    no_stages: bool,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    l2t::cli::run_main("bench", || {
        let args = Args::parse();
        let ctx = args.common.ctx()?;
        let cfg = &ctx.config;
        // The model shape of the configured tiny policy, random weights: throughput does not
        // depend on the values, and the bench needs no finished run.
        let (train, _) = l2t::task::arith::generate(&l2t::config::TaskConfig { n_train: 512, n_eval: 8, ..cfg.task.clone() }, cfg.seed)?;
        let tok = tokenizer::train(&l2t::stages::solution_corpus(&train), cfg.model.vocab_size)?;
        let eos = tokenizer::required_id(&tok, tokenizer::EOS)?;
        let model_cfg = model::tiny_config(&cfg.model, eos);
        let weights = model::init_weights(&model_cfg, cfg.seed, &ctx.device)?;
        let policy = Policy::from_parts(&model_cfg, &weights, tok.clone(), &ctx.device)?;
        let threads = candle_threads();
        for batch in [1usize, 64] {
            let requests: Vec<Request> = (0..batch)
                .map(|i| Ok(Request { prompt_ids: tokenizer::encode(&tok, &train[i].prompt)?, seed: i as u64 }))
                .collect::<Result<_>>()?;
            let params = SamplerParams { temperature: 1.0, top_p: 1.0, max_new_tokens: args.new_tokens, ignore_eos: true };
            let mut rates = Vec::new();
            for _ in 0..args.repeats {
                let t = Instant::now();
                let gens = generate(&policy, &requests, &params, batch, |_| {})?;
                let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
                rates.push(tokens as f64 / t.elapsed().as_secs_f64());
            }
            println!(
                "{}",
                serde_json::json!({"workload": format!("tiny sampling batch {batch}"), "new_tokens": args.new_tokens,
                    "tokens_per_s": median(rates), "threads": threads})
            );
        }
        // Supervised steps at the bootstrap's batch size on worked solutions.
        let pad = tokenizer::required_id(&tok, tokenizer::PAD)?;
        let examples = l2t::stages::sft_examples(&train, &tok)?;
        let steps = 3;
        let params = SftParams { steps, batch_size: cfg.bootstrap.batch_size, lr: 1e-3, warmup_frac: 0.0, weight_decay: 0.0, max_grad_norm: 1.0, seed: 0 };
        let t = Instant::now();
        let (_, log) = sft::train(&model_cfg, weights, &examples, pad, &params, &ctx.device, |_| {})?;
        let seconds = t.elapsed().as_secs_f64();
        let tokens: usize = log.iter().map(|s| s.tokens).sum();
        println!(
            "{}",
            serde_json::json!({"workload": "tiny sft step", "batch_size": cfg.bootstrap.batch_size,
                "s_per_step": seconds / steps as f64, "tokens_per_s": tokens as f64 / seconds, "threads": threads})
        );
        match ctx.store.open_ref(&ctx.run, l2t::stages::BOOTSTRAP_SLOT) {
            Ok(art) => println!(
                "{}",
                serde_json::json!({"workload": "bootstrap wall time", "run": ctx.run, "wall_time_s": art.manifest.wall_time_s,
                    "train_seconds": art.manifest.metrics["train_seconds"], "steps": art.manifest.params["bootstrap"]["steps"]})
            ),
            Err(_) => println!("{}", serde_json::json!({"workload": "bootstrap wall time", "run": ctx.run, "note": "no bootstrap in this run yet: run `make iterate` first"})),
        }
        if !args.no_stages {
            stage_times(&ctx)?;
        }
        Ok(())
    })
}

/// Runs two iterations of every stage in a scratch store that reuses the run's bootstrap (or
/// trains a short one), and prints each stage's wall time. Iteration 0 has `D~ = 0` (no penalty
/// passes); iteration 1 is the representative one, timed with both estimators.
fn stage_times(ctx: &l2t::stages::Ctx) -> Result<()> {
    use l2t::stages::{self, Ctx};
    std::fs::create_dir_all(ctx.store.root())?;
    let scratch = tempfile::Builder::new().prefix(".bench-").tempdir_in(ctx.store.root())?;
    let mut config = ctx.config.clone();
    let base = ctx.store.open_ref(&ctx.run, stages::BOOTSTRAP_SLOT).ok();
    let policy_note = if base.is_some() { "the run's bootstrap policy" } else { "a 100-step bootstrap (no bootstrap in this run)" };
    if base.is_none() {
        config.bootstrap.steps = 100;
    }
    let with_estimator = |estimator: &str| -> Result<Ctx> {
        let mut c = config.clone();
        c.penalty.estimator = estimator.into();
        Ctx::new(scratch.path().to_path_buf(), "bench", c)
    };
    let fd = with_estimator("fd")?;
    let grad = with_estimator("grad")?;
    stages::run_prepare(&fd)?;
    if let Some(base) = &base {
        fd.store.import(base)?;
    }
    stages::run_bootstrap(&fd)?;
    for iter in 0..2u32 {
        let mut times = serde_json::Map::new();
        let mut time = |name: &str, summary: stages::Summary| {
            times.insert(name.to_string(), serde_json::json!((summary.seconds * 1000.0).round() / 1000.0));
        };
        time("sample", stages::run_sample(&fd, iter)?);
        time("segment", stages::run_segment(&fd, iter, 0)?);
        // grad first, so that the run's fisher-reward ref ends on the default estimator.
        time("fisher-reward (grad)", stages::run_fisher_reward(&grad, iter)?);
        time("fisher-reward (fd)", stages::run_fisher_reward(&fd, iter)?);
        time("credit-assign", stages::run_credit_assign(&fd, iter, 0)?);
        time("grpo-update", stages::run_grpo_update(&fd, iter)?);
        let rollouts = fd.config.sample.prompts_per_iter * fd.config.sample.group_size;
        println!(
            "{}",
            serde_json::json!({"workload": format!("tiny iteration {iter} stage seconds"), "policy": policy_note,
                "rollouts": rollouts, "seconds": times, "threads": candle_threads()})
        );
    }
    Ok(())
}

/// Threads candle's CPU kernels use.
fn candle_threads() -> usize {
    candle_core::utils::get_num_threads()
}
