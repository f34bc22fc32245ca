//! `bench`: the performance workloads of the peer comparison (shared/bench/peers), run on our
//! stack, one JSON line each: SmolLM2-135M sampling (batch 16 = 4 chat prompts x 4 samples, and
//! batch 1; 128 new tokens at T = 0.9; stop at EOS or fixed length), teacher-forced scoring of
//! 16 x 256 tokens, a full fine-tuning step on 16 x 256 tokens with AdamW, an L2T iteration at
//! TRL's GRPO shape (4 prompts x 4 generations x 64 tokens); the same sampling / scoring / train
//! step on the peers' tiny Qwen2; and the time of every stage of a tiny-task iteration.
//!
//! `--workload all` runs each workload in its own process, so each line's `peak_rss_mb` is that
//! workload's own. Nothing is asserted: figures are printed.
//!
//! On a GPU (`--device cuda:0`, a CUDA build; `--dtype bf16` for sampling and scoring), the same
//! workloads run on random weights in SmolLM2-135M's and Qwen2.5-1.5B's shapes
//! (`smollm2-shape-*`, `qwen2.5-1.5b-shape-*`: speed does not depend on the weights), sampling
//! also at batch 64; and two checks of the device path: `check-fixtures` (the tiny Hugging Face
//! fixtures' logits against transformers') and `check-iteration` (a tiny-task iteration, twice).
//! `gpu/check.sh` runs them all (docs/gpu.md).
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
    /// Sequences per forward/backward in the train step (gradients accumulate over the batch).
    /// Default: 2 for SmolLM2 on the CPU (keeps the peak under half of PyTorch's; 4 is ~10%
    /// faster at ~5.8 GB); the whole batch in one pass for the tiny model and on a GPU.
    #[arg(long)]
    micro_batch: Option<usize>,
    /// New tokens per sampled sequence.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Sequences x tokens of the scoring workload.
    #[arg(long, value_parser = parse_shape, default_value = "16x256")]
    score_shape: (usize, usize),
    /// Sequences x tokens of the train step.
    #[arg(long, value_parser = parse_shape, default_value = "16x256")]
    train_shape: (usize, usize),
    /// `check-fixtures`: the tiny Hugging Face checkpoints with their transformers logits.
    #[arg(long, default_value = "tests/fixtures/tiny_hf")]
    fixtures: PathBuf,
}

/// `ROWSxTOKENS`, as `16x256`.
fn parse_shape(text: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("expected ROWSxTOKENS (as 16x256), got {text:?}");
    let (rows, tokens) = text.split_once('x').ok_or_else(bad)?;
    match (rows.parse(), tokens.parse()) {
        (Ok(r), Ok(t)) if r > 0 && t > 1 => Ok((r, t)),
        _ => Err(bad()),
    }
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

/// The device and dtype every line of this process records (set once its context is opened).
static BACKEND: std::sync::OnceLock<l2t::store::Backend> = std::sync::OnceLock::new();

fn emit(mut line: serde_json::Value) {
    line["peak_rss_mb"] = serde_json::json!((peak_rss_mb() * 10.0).round() / 10.0);
    line["threads"] = threads().into();
    if let Some(backend) = BACKEND.get() {
        line["device"] = backend.device.clone().into();
        line["dtype"] = backend.dtype.clone().into();
    }
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

/// The models of the workloads: random weights in two real models' shapes, SmolLM2 from its
/// GGUF, the peers' tiny Qwen2 (a name is matched before any name it starts).
const MODELS: [&str; 4] = ["smollm2-shape", "qwen2.5-1.5b-shape", "smollm2", "tiny-qwen2"];

fn run(args: &Args, workload: &str) -> Result<()> {
    let ctx = args.common.ctx()?;
    // On the kernels' pool, as a stage's work runs.
    l2t::kernels::on_pool(|| run_on(args, &ctx, workload))
}

fn run_on(args: &Args, ctx: &l2t::pipeline::Ctx, workload: &str) -> Result<()> {
    let (dev, dtype) = (ctx.device.clone(), ctx.dtype);
    BACKEND.get_or_init(|| ctx.backend());
    let unknown = || anyhow::anyhow!("unknown workload {workload:?} (`--workload list` lists them)");
    match workload {
        "tiny-iteration-stages" => return stage_times(ctx),
        "check-fixtures" => return check_fixtures(&args.fixtures, &dev, dtype),
        "check-iteration" => return check_iteration(ctx),
        _ => {}
    }
    let (model_name, rest) =
        MODELS.iter().find_map(|m| workload.strip_prefix(m).and_then(|r| r.strip_prefix('-')).map(|r| (*m, r))).ok_or_else(unknown)?;
    let policy = match model_name {
        "smollm2" => Policy::from_checkpoint_as(
            model::read_checkpoint(&args.smollm2, &dev).with_context(|| "run `make models` first")?,
            &dev,
            dtype,
        )?,
        "tiny-qwen2" => random_policy(tiny_qwen2_config(), &dev, dtype)?,
        shape => random_policy(real_shape(shape)?, &dev, dtype)?,
    };
    let prompts = prompts(&policy, model_name)?;
    match rest {
        r if r.starts_with("generate-b") => {
            let (batch, mode) = r["generate-b".len()..].split_once('-').ok_or_else(unknown)?;
            let batch: usize = batch.parse().map_err(|_| unknown())?;
            if batch != 1 && !batch.is_multiple_of(prompts.len()) {
                bail!("{workload}: the batch is 1 or a multiple of the {} prompts", prompts.len());
            }
            bench_generate(args, workload, &policy, &prompts, batch, mode == "fixed")
        }
        "score" => bench_score(args, workload, &policy),
        "train-step" => bench_train(args, workload, policy, &dev),
        "l2t-iteration" if model_name == "smollm2" => bench_iteration(args, &ctx.config, Method::L2t),
        "outcome-iteration" if model_name == "smollm2" => bench_iteration(args, &ctx.config, Method::Outcome),
        _ => Err(unknown()),
    }
}

/// The peers' tiny Qwen2 (hidden 256, 4 layers, 4 heads / 2 KV, FFN 1024, vocab 512).
fn tiny_qwen2_config() -> model::Config {
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
    model::tiny_config(&shape, 2)
}

/// SmolLM2-135M's (Llama) and Qwen2.5-1.5B's (Qwen2, q/k/v biases) shapes, as their config.json
/// files give them.
fn real_shape(name: &str) -> Result<model::Config> {
    let (shape, model_type, eps) = match name {
        "smollm2-shape" => (
            l2t::config::ModelShape {
                vocab_size: 49_152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                max_position_embeddings: 8192,
                rope_theta: 100_000.0,
                tie_word_embeddings: true,
            },
            "llama",
            1e-5,
        ),
        "qwen2.5-1.5b-shape" => (
            l2t::config::ModelShape {
                vocab_size: 151_936,
                hidden_size: 1536,
                intermediate_size: 8960,
                num_hidden_layers: 28,
                num_attention_heads: 12,
                num_key_value_heads: 2,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: true,
            },
            "qwen2",
            1e-6,
        ),
        other => bail!("no shape named {other:?}"),
    };
    Ok(model::Config { model_type: model_type.into(), rms_norm_eps: eps, ..model::tiny_config(&shape, 2) })
}

/// A policy with random weights and a small tokenizer (the workloads feed token ids). On the CPU
/// the weights are the tiny policy's seeded init; on a GPU they are drawn on the device itself
/// (N(0, 0.02) matrices, unit norms, zero biases: a 1.5B model in a moment).
fn random_policy(cfg: model::Config, dev: &candle_core::Device, dtype: candle_core::DType) -> Result<Policy> {
    let weights = if dev.is_cpu() { model::init_weights(&cfg, 0, dev)? } else { device_random_weights(&cfg, dev)? };
    let tok = tokenizer::train(&vec!["What is 12 plus 30? 42.".to_string(); 8], 300)?;
    Policy::from_checkpoint_as(Checkpoint { weights, cfg, tokenizer: tok, tokenizer_config: serde_json::json!({}) }, dev, dtype)
}

fn device_random_weights(cfg: &model::Config, dev: &candle_core::Device) -> Result<model::Weights> {
    use candle_core::Tensor;
    dev.set_seed(0)?;
    let mut weights = model::Weights::new();
    for (name, shape) in cfg.tensor_shapes() {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, candle_core::DType::F32, dev)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, candle_core::DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, dev)?
        };
        weights.insert(name, t);
    }
    Ok(weights)
}

/// SmolLM2: the four prompts through its chat template; random weights: random ids of the peers' lengths.
fn prompts(policy: &Policy, model_name: &str) -> Result<Vec<Vec<u32>>> {
    if model_name == "smollm2" {
        let cfg = PromptConfig { template: Template::Chat, ..Default::default() };
        return PROMPTS.iter().map(|p| chat::prompt_ids(policy, &cfg, p)).collect();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    Ok(TINY_PROMPT_LENS.iter().map(|&n| (0..n).map(|_| rng.random_range(3..policy.cfg.vocab_size as u32)).collect()).collect())
}

fn bench_generate(args: &Args, workload: &str, policy: &Policy, prompts: &[Vec<u32>], batch: usize, fixed: bool) -> Result<()> {
    let per_prompt = batch / prompts.len();
    let requests: Vec<Request> = if batch == 1 {
        vec![Request { prompt_ids: prompts[0].clone(), seed: 1234 }]
    } else {
        prompts
            .iter()
            .flat_map(|p| (0..per_prompt).map(move |s| (p, s)))
            .enumerate()
            .map(|(i, (p, _))| Request { prompt_ids: p.clone(), seed: 1234 + i as u64 })
            .collect()
    };
    let params = SamplerParams { temperature: 0.9, top_p: 1.0, max_new_tokens: args.new_tokens, ignore_eos: fixed };
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
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(), "max_new_tokens": args.new_tokens, "temperature": 0.9,
        "reps": args.reps, "wall_s": walls, "gen_tokens": counts, "median_tok_per_s": median(&rates)}));
    Ok(())
}

/// Random ids in [3, vocab), `rows x tokens` (the peers' seed differs; the cost does not depend
/// on them).
fn random_batch(vocab: usize, (rows, tokens): (usize, usize), seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..rows).map(|_| (0..tokens).map(|_| rng.random_range(3..vocab as u32)).collect()).collect()
}

/// Per-token log-probs of `--score-shape` random sequences, 16 rows per pass.
fn bench_score(args: &Args, workload: &str, policy: &Policy) -> Result<()> {
    let (rows, seq) = args.score_shape;
    let seqs = random_batch(policy.cfg.vocab_size, args.score_shape, 2);
    let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (&s[..1], &s[1..])).collect();
    let logp = model::response_logprobs(&policy.model, &pairs, policy.pad_id, 16)?;
    let mean = logp.iter().flatten().map(|&x| f64::from(x)).sum::<f64>() / (rows * (seq - 1)) as f64;
    let mut walls = Vec::new();
    for _ in 0..args.reps {
        let t = Instant::now();
        model::response_logprobs(&policy.model, &pairs, policy.pad_id, 16)?;
        walls.push(t.elapsed().as_secs_f64());
    }
    let tokens = rows * seq;
    emit(serde_json::json!({"workload": workload, "batch": rows, "seq": seq, "tokens": tokens, "reps": args.reps, "wall_s": walls,
        "median_tok_per_s": tokens as f64 / median(&walls), "mean_logp": mean}));
    Ok(())
}

fn bench_train(args: &Args, workload: &str, policy: Policy, dev: &candle_core::Device) -> Result<()> {
    let (rows, seq) = args.train_shape;
    let seqs = random_batch(policy.cfg.vocab_size, args.train_shape, 3);
    let examples: Vec<Example> = seqs.iter().map(|s| Example { prompt: s[..1].to_vec(), completion: s[1..].to_vec() }).collect();
    let steps = args.reps + 1;
    let params =
        SftParams { steps, batch_size: rows, lr: 1e-5, warmup_frac: 0.0, weight_decay: 0.0, max_grad_norm: f64::INFINITY, seed: 0 };
    let mut marks = vec![Instant::now()];
    let mut losses = Vec::new();
    let (cfg, weights, pad) = (policy.cfg.clone(), policy.weights.clone(), policy.pad_id);
    drop(policy);
    // A GPU takes the whole batch in one pass.
    let micro_batch = args.micro_batch.unwrap_or(if workload.starts_with("tiny") || !dev.is_cpu() { rows } else { 2 });
    sft::train_micro(&cfg, weights, &examples, pad, &params, micro_batch, dev, |s| {
        marks.push(Instant::now());
        losses.push(s.loss);
    })?;
    // The first step is the warm-up (it also allocates the AdamW state).
    let walls: Vec<f64> = marks.windows(2).skip(1).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    let tokens = rows * seq;
    emit(serde_json::json!({"workload": workload, "batch": rows, "seq": seq, "tokens": tokens, "micro_batch": micro_batch,
        "optimizer": "AdamW (f32 moments)", "reps": args.reps, "wall_s": walls, "median_s_per_step": median(&walls),
        "median_tok_per_s": tokens as f64 / median(&walls), "losses": losses}));
    Ok(())
}

/// Two iterations of SmolLM2 at TRL's GRPO shape (4 prompts x 4 generations, 64 new tokens) in a
/// scratch store, with L2T's credit or outcome GRPO's (the like-for-like peer of TRL's step), the
/// update set as TRL's (beta 0, one optimizer step);
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
    // As the TRL peer's step: no KL term (TRL's default beta = 0, so no reference pass) and one
    // optimizer step per generation.
    config.update.beta_kl = 0.0;
    config.update.minibatches = 1;
    config.credit.method = method;
    let scratch = tempfile::Builder::new().prefix(".bench-").tempdir()?;
    let ctx = Ctx::new(scratch.path().to_path_buf(), "bench", config)?;
    pipeline::run_prepare(&ctx)?;
    pipeline::run_bootstrap(&ctx)?;
    for iter in 0..2u32 {
        let mut seconds = std::collections::BTreeMap::new();
        let (mut fisher_split, mut update_split) = (serde_json::Value::Null, serde_json::Value::Null);
        let started = Instant::now();
        for stage in Stage::ITERATION {
            let summary = pipeline::run_iteration_stage(&ctx, stage, iter)?;
            seconds.insert(stage.name(), (summary.seconds * 1000.0).round() / 1000.0);
            if stage == Stage::FisherReward {
                fisher_split = serde_json::json!({"j": summary.metrics["j_seconds"], "penalty": summary.metrics["c_seconds"]});
            }
            if stage == Stage::GrpoUpdate {
                update_split = summary.metrics["phase_seconds"].clone();
            }
        }
        let overhead = seconds[Stage::FisherReward.name()] / seconds[Stage::Sample.name()];
        emit(serde_json::json!({"workload": format!("smollm2-{method}-iteration"), "iteration": iter, "prompts": 4, "generations": 4,
            "max_new_tokens": 64, "s_per_iteration": started.elapsed().as_secs_f64(), "stage_seconds": seconds,
            "fisher_reward_seconds": fisher_split, "grpo_update_seconds": update_split, "l2t_overhead": (overhead * 1000.0).round() / 1000.0}));
    }
    Ok(())
}

/// Runs two iterations of every stage of the tiny task in a scratch store that reuses the run's
/// bootstrap (or trains a short one), and prints each stage's wall time. Iteration 0 has `D~ = 0`
/// (no penalty passes); iteration 1 is the representative one, timed with each estimator.
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
    let jvp = with_estimator(Estimator::Jvp)?;
    let fd = with_estimator(Estimator::Fd)?;
    let grad = with_estimator(Estimator::Grad)?;
    pipeline::run_prepare(&jvp)?;
    if let Some(base) = &base {
        jvp.store.import(base)?;
    }
    pipeline::run_bootstrap(&jvp)?;
    for iter in 0..2u32 {
        let mut times = serde_json::Map::new();
        let mut time = |name: &str, summary: pipeline::Summary| {
            times.insert(name.to_string(), serde_json::json!((summary.seconds * 1000.0).round() / 1000.0));
        };
        time("sample", pipeline::run_iteration_stage(&jvp, Stage::Sample, iter)?);
        time("segment", pipeline::run_iteration_stage(&jvp, Stage::Segment, iter)?);
        // The default estimator last, so that the run's fisher-reward ref ends on it.
        time("fisher-reward (grad)", pipeline::run_fisher_reward(&grad, iter)?);
        time("fisher-reward (fd)", pipeline::run_fisher_reward(&fd, iter)?);
        time("fisher-reward (jvp)", pipeline::run_fisher_reward(&jvp, iter)?);
        time("credit-assign", pipeline::run_iteration_stage(&jvp, Stage::CreditAssign, iter)?);
        time("grpo-update", pipeline::run_iteration_stage(&jvp, Stage::GrpoUpdate, iter)?);
        let rollouts = jvp.config.sample.prompts_per_iter * jvp.config.sample.group_size;
        emit(serde_json::json!({"workload": "tiny-iteration-stages", "iteration": iter, "policy": policy_note,
            "rollouts": rollouts, "stage_seconds": times}));
    }
    Ok(())
}

/// The tiny Hugging Face checkpoints of each family (`tests/fixtures/tiny_hf`, written by
/// transformers) through this device at this dtype, against transformers' f32 logits: one line
/// per family with the largest error over every logit and log-sum-exp and whether it is within
/// the dtype's tolerance. f32: 1e-4, as on the CPU. bf16: 2^-8 relative rounding of weights and
/// activations through the layers, on logits of size ~0.5, gives errors of a few 1e-3; 3e-2
/// holds them with margin and still fails a wrong kernel (whose errors are the logits' size).
fn check_fixtures(dir: &std::path::Path, dev: &candle_core::Device, dtype: candle_core::DType) -> Result<()> {
    let tolerance = if dtype == candle_core::DType::F32 { 1e-4 } else { 3e-2 };
    let floats = |v: &serde_json::Value| -> Result<Vec<f64>> {
        v.as_array().context("expected an array")?.iter().map(|x| x.as_f64().context("expected a number")).collect()
    };
    let mut failed = Vec::new();
    for family in ["qwen2", "llama", "qwen3"] {
        let path = dir.join(family);
        let ckpt = model::hf::read_dir(&path, dev).with_context(|| format!("{}", path.display()))?;
        let policy = Policy::from_checkpoint_as(ckpt, dev, dtype)?;
        let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(path.join("reference.json"))?)?;
        let ids: Vec<u32> = floats(&reference["token_ids"])?.into_iter().map(|x| x as u32).collect();
        let logits: Vec<Vec<f32>> = model::score::logits(&policy, &ids)?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        let want_rows = reference["logits"].as_array().context("reference logits")?;
        let want_lse = floats(&reference["logsumexp"])?;
        if want_rows.len() != logits.len() || want_lse.len() != logits.len() {
            bail!("{family}: {} positions scored, the reference has {}", logits.len(), want_rows.len());
        }
        let (mut worst, mut scale) = (0f64, 0f64);
        for ((row, want), lse) in logits.iter().zip(want_rows).zip(want_lse) {
            for (&got, want) in row.iter().zip(floats(want)?) {
                worst = worst.max((f64::from(got) - want).abs());
                scale = scale.max(want.abs());
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let got_lse = m + row.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln();
            worst = worst.max((got_lse - lse).abs());
        }
        let pass = worst <= tolerance;
        if !pass {
            failed.push(family);
        }
        emit(serde_json::json!({"check": "fixture-logits", "family": family, "positions": logits.len(),
            "max_abs_error": worst, "max_abs_logit": scale, "tolerance": tolerance, "pass": pass}));
    }
    if !failed.is_empty() {
        bail!("logits differ from transformers' beyond {tolerance} for {}", failed.join(", "));
    }
    Ok(())
}

/// A whole tiny-task iteration (prepare -> grpo-update, a 20-step bootstrap, 8 prompts x 4
/// samples) on this device, run
/// twice in two fresh stores under the artifacts folder, with what the CPU end-to-end tests
/// check: every tensor gets a gradient, the update lowers its batch's loss, the sampler's
/// log-probs match the trainer's, each table has its rows; then whether the two runs wrote the
/// same bytes, stage by stage. One line per stage per run, one verdict line.
fn check_iteration(ctx: &l2t::pipeline::Ctx) -> Result<()> {
    use l2t::pipeline::{self, Ctx};
    let mut config = ctx.config.clone();
    // Small enough to run in a minute on the CPU (the dry run): what is checked does not depend
    // on the scale.
    config.bootstrap.steps = 20;
    config.bootstrap.eval_prompts = 0;
    config.sample.prompts_per_iter = 8;
    config.sample.group_size = 4;
    config.update.loss_after = true;
    config.update.audit_logp_old = true;
    let stages: Vec<Stage> = [Stage::Prepare, Stage::Bootstrap].into_iter().chain(Stage::ITERATION).collect();
    let mut outputs: Vec<Vec<Vec<(String, String)>>> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for (attempt, store) in ["check-a", "check-b"].into_iter().enumerate() {
        let root = ctx.store.root().join(store);
        if root.exists() {
            std::fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
        }
        let run_ctx = Ctx::new(root, "check", config.clone())?;
        let mut per_stage = Vec::new();
        for &stage in &stages {
            let summary = match stage {
                Stage::Prepare => pipeline::run_prepare(&run_ctx)?,
                Stage::Bootstrap => pipeline::run_bootstrap(&run_ctx)?,
                s => pipeline::run_iteration_stage(&run_ctx, s, 0)?,
            };
            let slot = if Stage::ITERATION.contains(&stage) { stage.at(0) } else { stage.name().to_string() };
            let artifact = run_ctx.store.open_ref(&run_ctx.run, &slot)?;
            per_stage.push(artifact.manifest.outputs.iter().map(|o| (o.file.clone(), o.blake3.clone())).collect());
            emit(serde_json::json!({"check": "iteration-stage", "run": attempt + 1, "stage": stage.name(), "rows": summary.rows,
                "seconds": summary.seconds, "metrics": summary.metrics}));
            if attempt > 0 {
                continue;
            }
            let m = &summary.metrics;
            match stage {
                Stage::Sample => {
                    let want = (config.sample.prompts_per_iter * config.sample.group_size) as u64;
                    if m["rollouts"].as_u64() != Some(want) {
                        problems.push(format!("sample wrote {} rollouts, not {want}", m["rollouts"]));
                    }
                }
                Stage::GrpoUpdate => {
                    let (with_grad, tensors) = (m["tensors_with_grad"].as_u64(), m["tensors"].as_u64());
                    if with_grad.is_none() || with_grad != tensors {
                        problems.push(format!("{with_grad:?} of {tensors:?} tensors got a gradient"));
                    }
                    let (before, after) = (m["batch_loss_before"].as_f64(), m["batch_loss_after"].as_f64());
                    if !matches!((before, after), (Some(b), Some(a)) if a < b) {
                        problems.push(format!("the update took its batch's loss from {before:?} to {after:?}"));
                    }
                    // The sampler's log-probs against the trainer's f32 recompute: bf16 sampling
                    // is allowed its rounding, f32 only the order of its sums.
                    let limit = if ctx.dtype == candle_core::DType::F32 { 1e-3 } else { 0.25 };
                    match m["logp_mismatch_max"].as_f64() {
                        Some(x) if x <= limit => {}
                        other => problems.push(format!("sampler/trainer log-prob mismatch {other:?} above {limit}")),
                    }
                }
                _ if summary.rows == 0 && stage != Stage::Bootstrap => problems.push(format!("{} wrote no rows", stage.name())),
                _ => {}
            }
        }
        outputs.push(per_stage);
    }
    let differing: Vec<&str> =
        stages.iter().zip(outputs[0].iter().zip(&outputs[1])).filter(|(_, (a, b))| a != b).map(|(s, _)| s.name()).collect();
    emit(serde_json::json!({"check": "iteration", "pass": problems.is_empty(), "problems": problems,
        "byte_identical": differing.is_empty(), "stages_differing": differing}));
    if !problems.is_empty() {
        bail!("the iteration check failed: {}", problems.join("; "));
    }
    Ok(())
}
