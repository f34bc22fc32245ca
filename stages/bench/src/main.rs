//! `bench`: the performance workloads of the peer comparison (shared/bench/peers), run on our
//! stack, one JSON line each: SmolLM2-135M sampling (batch 16 = 4 chat prompts x 4 samples, and
//! batch 1; 128 new tokens at T = 0.9; stop at EOS or fixed length), teacher-forced scoring of
//! 16 x 256 tokens, a full fine-tuning step on 16 x 256 tokens with AdamW, an L2T iteration at
//! TRL's GRPO shape (4 prompts x 4 generations x 64 tokens); the same sampling / scoring / train
//! step on the peers' tiny Qwen2; and the time of every stage of a tiny-task iteration.
//!
//! `--workload all` runs each workload in its own process, so each line's `peak_rss_mb` is that
//! workload's own. Nothing is asserted: figures are printed.
use anyhow::{bail, Context, Result};
use clap::Parser;
use l2t::config::{Config, Estimator, Method, PromptConfig, PromptStyle, Rule, Template};
use l2t::model::{self, chat, tokenizer, Checkpoint, Policy};
use l2t::sampler::{generate, Request, SamplerParams};
use l2t::stage::Stage;
use l2t::train::sft::{self, Example, SftParams};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

/// The peers' workloads on our stack (see shared/bench/README.md), one JSON line each.
#[derive(Parser)]
#[command(name = "bench", version)]
struct Args {
    #[command(flatten)]
    common: l2t::cli::Common,
    /// A workload name, or `all` (each in its own process), or `list`.
    #[arg(long, default_value = "all")]
    workload: String,
    /// Timed repetitions (the median is reported); sampling and scoring do one warm-up first.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// SmolLM2-135M-Instruct as GGUF (`make models`).
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    smollm2: PathBuf,
    /// Sequences per forward/backward in the train step (gradients accumulate over the 16).
    /// Default: 2 for SmolLM2 (keeps the peak under half of PyTorch's; 4 is ~10% faster at
    /// ~5.8 GB), 16 for the tiny model (the whole batch in one pass).
    #[arg(long)]
    micro_batch: Option<usize>,
}

const WORKLOADS: &[&str] = &[
    "smollm2-generate-b16-eos",
    "smollm2-generate-b16-fixed",
    "smollm2-generate-b1-eos",
    "smollm2-generate-b1-fixed",
    "smollm2-score",
    "smollm2-train-step",
    "smollm2-l2t-iteration",
    "smollm2-outcome-iteration",
    "tiny-qwen2-generate-b16-fixed",
    "tiny-qwen2-generate-b1-fixed",
    "tiny-qwen2-score",
    "tiny-qwen2-train-step",
    "tiny-iteration-stages",
];

/// The peers' four GSM-style chat prompts (shared/bench/peers/common.py).
const PROMPTS: [&str; 4] =
    ["Sam has 9 pens and loses 4. How many left?", "What is 12 plus 30?", "What is 7 times 8 minus 5?", "What is half of 46?"];
/// Prompt lengths the peers give the tiny model (random ids).
const TINY_PROMPT_LENS: [usize; 4] = [44, 40, 41, 38];

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kb.unwrap_or(0.0) / 1024.0
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn emit(mut line: serde_json::Value) {
    line["peak_rss_mb"] = serde_json::json!((peak_rss_mb() * 10.0).round() / 10.0);
    line["threads"] = threads().into();
    println!("{line}");
}

fn main() {
    l2t::cli::run_main("bench", || {
        let args = Args::parse();
        match args.workload.as_str() {
            "list" => WORKLOADS.iter().for_each(|w| println!("{w}")),
            "all" => {
                let me = std::env::current_exe()?;
                for w in WORKLOADS {
                    let status = std::process::Command::new(&me)
                        .args(std::env::args().skip(1).filter(|a| !a.starts_with("--workload")))
                        .args(["--workload", w])
                        .status()?;
                    if !status.success() {
                        bail!("workload {w} failed");
                    }
                }
            }
            w => run(&args, w)?,
        }
        Ok(())
    })
}

fn run(args: &Args, workload: &str) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let ctx = args.common.ctx()?;
    let unknown = || anyhow::anyhow!("unknown workload {workload:?} (`--workload list` lists them)");
    if workload == "tiny-iteration-stages" {
        return stage_times(&ctx);
    }
    let (model_name, rest) = ["smollm2", "tiny-qwen2"]
        .iter()
        .find_map(|m| workload.strip_prefix(m).and_then(|r| r.strip_prefix('-')).map(|r| (*m, r)))
        .ok_or_else(unknown)?;
    let policy = if model_name == "smollm2" {
        Policy::from_checkpoint(model::read_checkpoint(&args.smollm2, &dev).with_context(|| "run `make models` first")?, &dev)?
    } else {
        tiny_qwen2(&dev)?
    };
    let prompts = prompts(&policy, model_name)?;
    match rest {
        r if r.starts_with("generate-") => {
            let batch: usize = if r.contains("-b16-") { 16 } else { 1 };
            let fixed = r.ends_with("-fixed");
            bench_generate(args, workload, &policy, &prompts, batch, fixed)
        }
        "score" => bench_score(args, workload, &policy),
        "train-step" => bench_train(args, workload, policy),
        "l2t-iteration" if model_name == "smollm2" => bench_iteration(args, &ctx.config, Method::L2t),
        "outcome-iteration" if model_name == "smollm2" => bench_iteration(args, &ctx.config, Method::Outcome),
        _ => Err(unknown()),
    }
}

/// The peers' tiny Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV, FFN 1024, vocab 512), random weights.
fn tiny_qwen2(dev: &candle_core::Device) -> Result<Policy> {
    let shape = l2t::config::ModelShape {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 1024,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 2048,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
    };
    let cfg = model::tiny_config(&shape, 2);
    let tok = tokenizer::train(&vec!["What is 12 plus 30? 42.".to_string(); 8], 300)?;
    let ckpt = Checkpoint { weights: model::init_weights(&cfg, 0, dev)?, cfg, tokenizer: tok, tokenizer_config: serde_json::json!({}) };
    Policy::from_checkpoint(ckpt, dev)
}

/// SmolLM2: the four prompts through its chat template; tiny Qwen2: random ids of the peers' lengths.
fn prompts(policy: &Policy, model_name: &str) -> Result<Vec<Vec<u32>>> {
    if model_name == "smollm2" {
        let cfg = PromptConfig { template: Template::Chat, ..Default::default() };
        return PROMPTS.iter().map(|p| chat::prompt_ids(policy, &cfg, p)).collect();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    Ok(TINY_PROMPT_LENS.iter().map(|&n| (0..n).map(|_| rng.random_range(3..policy.cfg.vocab_size as u32)).collect()).collect())
}

fn bench_generate(args: &Args, workload: &str, policy: &Policy, prompts: &[Vec<u32>], batch: usize, fixed: bool) -> Result<()> {
    let requests: Vec<Request> = if batch == 1 {
        vec![Request { prompt_ids: prompts[0].clone(), seed: 1234 }]
    } else {
        prompts
            .iter()
            .flat_map(|p| (0..4).map(move |s| (p, s)))
            .enumerate()
            .map(|(i, (p, _))| Request { prompt_ids: p.clone(), seed: 1234 + i as u64 })
            .collect()
    };
    let params = SamplerParams { temperature: 0.9, top_p: 1.0, max_new_tokens: 128, ignore_eos: fixed };
    generate(policy, &requests, &SamplerParams { max_new_tokens: 8, ..params }, batch, |_| {})?;
    let (mut walls, mut counts) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let t = Instant::now();
        let gens = generate(policy, &requests, &params, batch, |_| {})?;
        walls.push(t.elapsed().as_secs_f64());
        counts.push(gens.iter().map(|g| g.tokens.len()).sum::<usize>());
    }
    let rates: Vec<f64> = walls.iter().zip(&counts).map(|(w, &c)| c as f64 / w).collect();
    emit(serde_json::json!({"workload": workload, "batch": batch, "mode": if fixed { "fixed" } else { "eos" },
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(), "max_new_tokens": 128, "temperature": 0.9,
        "reps": args.reps, "wall_s": walls, "gen_tokens": counts, "median_tok_per_s": median(&rates)}));
    Ok(())
}

/// Random ids in [3, vocab), 16 x 256 (the peers' seed differs; the cost does not depend on them).
fn random_batch(vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..16).map(|_| (0..256).map(|_| rng.random_range(3..vocab as u32)).collect()).collect()
}

fn bench_score(args: &Args, workload: &str, policy: &Policy) -> Result<()> {
    let seqs = random_batch(policy.cfg.vocab_size, 2);
    let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (&s[..1], &s[1..])).collect();
    let logp = model::response_logprobs(&policy.model, &pairs, policy.pad_id, 16)?;
    let mean = logp.iter().flatten().map(|&x| f64::from(x)).sum::<f64>() / (16.0 * 255.0);
    let mut walls = Vec::new();
    for _ in 0..args.reps {
        let t = Instant::now();
        model::response_logprobs(&policy.model, &pairs, policy.pad_id, 16)?;
        walls.push(t.elapsed().as_secs_f64());
    }
    emit(serde_json::json!({"workload": workload, "batch": 16, "seq": 256, "tokens": 4096, "reps": args.reps, "wall_s": walls,
        "median_tok_per_s": 4096.0 / median(&walls), "mean_logp": mean}));
    Ok(())
}

fn bench_train(args: &Args, workload: &str, policy: Policy) -> Result<()> {
    let seqs = random_batch(policy.cfg.vocab_size, 3);
    let examples: Vec<Example> = seqs.iter().map(|s| Example { prompt: s[..1].to_vec(), completion: s[1..].to_vec() }).collect();
    let steps = args.reps + 1;
    let params = SftParams { steps, batch_size: 16, lr: 1e-5, warmup_frac: 0.0, weight_decay: 0.0, max_grad_norm: f64::INFINITY, seed: 0 };
    let mut marks = vec![Instant::now()];
    let mut losses = Vec::new();
    let (cfg, weights, pad) = (policy.cfg.clone(), policy.weights.clone(), policy.pad_id);
    drop(policy);
    let micro_batch = args.micro_batch.unwrap_or(if workload.starts_with("tiny") { 16 } else { 2 });
    sft::train_micro(&cfg, weights, &examples, pad, &params, micro_batch, &candle_core::Device::Cpu, |s| {
        marks.push(Instant::now());
        losses.push(s.loss);
    })?;
    // The first step is the warm-up (it also allocates the AdamW state).
    let walls: Vec<f64> = marks.windows(2).skip(1).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    emit(serde_json::json!({"workload": workload, "batch": 16, "seq": 256, "tokens": 4096, "micro_batch": micro_batch,
        "optimizer": "AdamW (f32 moments)", "reps": args.reps, "wall_s": walls, "median_s_per_step": median(&walls),
        "median_tok_per_s": 4096.0 / median(&walls), "losses": losses}));
    Ok(())
}

/// Two iterations of SmolLM2 at TRL's GRPO shape (4 prompts x 4 generations, 64 new tokens) in a
/// scratch store, with L2T's credit or outcome GRPO's (the like-for-like peer of TRL's step);
/// iteration 1 (where the penalty is computed) is the figure. `l2t_overhead` is `fisher-reward`'s
/// time over `sample`'s, what the dense reward costs beside generation.
fn bench_iteration(args: &Args, base: &Config, method: Method) -> Result<()> {
    use l2t::pipeline::{self, Ctx};
    let mut config = base.clone();
    config.bootstrap.source = l2t::config::Source::Checkpoint(args.smollm2.clone());
    config.bootstrap.eval_prompts = 0;
    config.task.prompt_style = PromptStyle::Question;
    config.task.eval_file = None;
    config.prompt = PromptConfig { template: Template::Chat, system: String::new(), instructions: "Finish with \\boxed{answer}.".into() };
    config.sample.prompts_per_iter = 4;
    config.sample.group_size = 4;
    config.sample.max_new_tokens = 64;
    config.sample.batch_rows = 16;
    config.segment.rule = Rule::Paragraphs;
    config.reward.batch_rows = 16;
    config.update.micro_batch = 4;
    config.update.lr = 1e-6;
    config.credit.method = method;
    let scratch = tempfile::Builder::new().prefix(".bench-").tempdir()?;
    let ctx = Ctx::new(scratch.path().to_path_buf(), "bench", config)?;
    pipeline::run_prepare(&ctx)?;
    pipeline::run_bootstrap(&ctx)?;
    for iter in 0..2u32 {
        let mut seconds = std::collections::BTreeMap::new();
        let started = Instant::now();
        for stage in Stage::ITERATION {
            let summary = pipeline::run_iteration_stage(&ctx, stage, iter)?;
            seconds.insert(stage.name(), (summary.seconds * 1000.0).round() / 1000.0);
        }
        let overhead = seconds[Stage::FisherReward.name()] / seconds[Stage::Sample.name()];
        emit(serde_json::json!({"workload": format!("smollm2-{method}-iteration"), "iteration": iter, "prompts": 4, "generations": 4,
            "max_new_tokens": 64, "s_per_iteration": started.elapsed().as_secs_f64(), "stage_seconds": seconds,
            "l2t_overhead": (overhead * 1000.0).round() / 1000.0}));
    }
    Ok(())
}

/// Runs two iterations of every stage of the tiny task in a scratch store that reuses the run's
/// bootstrap (or trains a short one), and prints each stage's wall time. Iteration 0 has `D~ = 0`
/// (no penalty passes); iteration 1 is the representative one, timed with both estimators.
fn stage_times(ctx: &l2t::pipeline::Ctx) -> Result<()> {
    use l2t::pipeline::{self, Ctx};
    std::fs::create_dir_all(ctx.store.root())?;
    let scratch = tempfile::Builder::new().prefix(".bench-").tempdir_in(ctx.store.root())?;
    let mut config = ctx.config.clone();
    let base = ctx.store.open_ref(&ctx.run, Stage::Bootstrap.name()).ok();
    let policy_note = if base.is_some() { "the run's bootstrap policy" } else { "a 100-step bootstrap (no bootstrap in this run)" };
    if base.is_none() {
        config.bootstrap.steps = 100;
    }
    let with_estimator = |estimator: Estimator| -> Result<Ctx> {
        let mut c = config.clone();
        c.penalty.estimator = estimator;
        Ctx::new(scratch.path().to_path_buf(), "bench", c)
    };
    let fd = with_estimator(Estimator::Fd)?;
    let grad = with_estimator(Estimator::Grad)?;
    pipeline::run_prepare(&fd)?;
    if let Some(base) = &base {
        fd.store.import(base)?;
    }
    pipeline::run_bootstrap(&fd)?;
    for iter in 0..2u32 {
        let mut times = serde_json::Map::new();
        let mut time = |name: &str, summary: pipeline::Summary| {
            times.insert(name.to_string(), serde_json::json!((summary.seconds * 1000.0).round() / 1000.0));
        };
        time("sample", pipeline::run_iteration_stage(&fd, Stage::Sample, iter)?);
        time("segment", pipeline::run_iteration_stage(&fd, Stage::Segment, iter)?);
        // grad first, so that the run's fisher-reward ref ends on the default estimator.
        time("fisher-reward (grad)", pipeline::run_fisher_reward(&grad, iter)?);
        time("fisher-reward (fd)", pipeline::run_fisher_reward(&fd, iter)?);
        time("credit-assign", pipeline::run_iteration_stage(&fd, Stage::CreditAssign, iter)?);
        time("grpo-update", pipeline::run_iteration_stage(&fd, Stage::GrpoUpdate, iter)?);
        let rollouts = fd.config.sample.prompts_per_iter * fd.config.sample.group_size;
        emit(serde_json::json!({"workload": "tiny-iteration-stages", "iteration": iter, "policy": policy_note,
            "rollouts": rollouts, "stage_seconds": times}));
    }
    Ok(())
}
