//! `bench`: sampling throughput of the tiny policy at batch 1 and 64, the supervised step time,
//! and the run's bootstrap wall time. One JSON line per workload; nothing is asserted.
use anyhow::Result;
use clap::Parser;
use l2t::model::{self, tokenizer, Policy};
use l2t::sample::{generate, Request, SamplerParams};
use l2t::train::sft::{self, SftParams};
use std::time::Instant;

/// Prints tiny-policy sampling throughput (batch 1 and 64), SFT step time and bootstrap wall time.
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
        Ok(())
    })
}

/// Threads candle's CPU kernels use.
fn candle_threads() -> usize {
    candle_core::utils::get_num_threads()
}
