//! One function per stage binary: resolve inputs through the run's refs, compute the stage key,
//! reuse or compute the outputs, publish the ref, and return a one-line summary.

use crate::config::Config;
use crate::model::tokenizer::{self, EOS, PAD};
use crate::model::{self, Policy};
use crate::reward::segment::{outcome_reward, segment, span_bytes, token_char_ends, Rule};
use crate::sample::{generate, Request, SamplerParams};
use crate::store::{self, iter_slot, stage_key, Artifact, InputRef, Manifest, Outcome, Staging, Store};
use crate::table::episodes::{self, EpisodeRow};
use crate::table::prompts::{self, PromptRow};
use crate::table::rollouts::{self, FinishReason, RolloutRow};
use crate::task::arith;
use crate::train::sft::{self, Example, SftParams};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

/// Stage versions: bump one when its output for the same inputs changes.
pub const PREPARE_VERSION: u32 = 1;
pub const BOOTSTRAP_VERSION: u32 = 1;
pub const SAMPLE_VERSION: u32 = 1;
pub const SEGMENT_VERSION: u32 = 1;

/// Run-level slots (iteration stages use [`iter_slot`]).
pub const PREPARE_SLOT: &str = "prepare";
pub const BOOTSTRAP_SLOT: &str = "bootstrap";

/// What every stage needs: where the store is, which run, the configuration.
pub struct Ctx {
    pub store: Store,
    pub run: String,
    pub config: Config,
    pub device: Device,
}

impl Ctx {
    pub fn new(artifacts: PathBuf, run: &str, config: Config) -> Result<Self> {
        if run.is_empty() || !run.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || run.starts_with('.') {
            bail!("run name {run:?} must be letters, digits, '-', '_' or '.'");
        }
        if config.threads > 0 {
            // candle's CPU kernels size their thread pool from this variable on first use.
            std::env::set_var("RAYON_NUM_THREADS", config.threads.to_string());
        }
        Ok(Self { store: Store::new(artifacts), run: run.to_string(), config, device: Device::Cpu })
    }
}

/// The one line a stage prints.
#[derive(Debug, Clone)]
pub struct Summary {
    pub stage: String,
    pub slot: String,
    pub outcome: Outcome,
    pub key: String,
    pub rows: u64,
    pub seconds: f64,
    pub ref_changed: bool,
    pub metrics: serde_json::Value,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outcome = match self.outcome {
            Outcome::Hit => "cache hit",
            Outcome::Miss => "computed",
        };
        write!(
            f,
            "{}: {outcome} key {} rows {} in {:.2}s -> {}{}",
            self.stage,
            store::short(&self.key),
            self.rows,
            self.seconds,
            self.slot,
            if self.ref_changed { " (ref updated)" } else { "" }
        )
    }
}

/// Reuses or computes one stage run and points the run's ref at it.
fn execute(
    ctx: &Ctx,
    stage: &str,
    version: u32,
    slot: &str,
    params: serde_json::Value,
    inputs: Vec<InputRef>,
    compute: impl FnOnce(&mut Staging) -> Result<serde_json::Value>,
) -> Result<Summary> {
    let started = Instant::now();
    let key = stage_key(stage, version, &params, &inputs);
    let (artifact, outcome) = match ctx.store.lookup(&key)? {
        Some(artifact) => (artifact, Outcome::Hit),
        None => {
            let mut staging = ctx.store.begin(&key)?;
            let metrics = compute(&mut staging)?;
            let mut manifest = Manifest::new(stage, version, &key, params, inputs, ctx.config.seed);
            manifest.wall_time_s = started.elapsed().as_secs_f64();
            manifest.metrics = metrics;
            (staging.publish(manifest)?, Outcome::Miss)
        }
    };
    let ref_changed = ctx.store.publish_ref(&ctx.run, slot, &artifact)?;
    Ok(Summary {
        stage: stage.into(),
        slot: slot.into(),
        outcome,
        key,
        rows: artifact.manifest.outputs.iter().filter_map(|o| o.rows).sum(),
        seconds: started.elapsed().as_secs_f64(),
        ref_changed,
        metrics: artifact.manifest.metrics.clone(),
    })
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("the progress template is valid"),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// `prepare`: the built-in task's train and eval splits.
pub fn run_prepare(ctx: &Ctx) -> Result<Summary> {
    let cfg = &ctx.config;
    execute(ctx, "prepare", PREPARE_VERSION, PREPARE_SLOT, cfg.stage_params("prepare")?, vec![], |staging| {
        let (train, eval) = arith::generate(&cfg.task, cfg.seed)?;
        prompts::write(staging, prompts::TRAIN_FILE, &train)?;
        prompts::write(staging, prompts::EVAL_FILE, &eval)?;
        let mean_redundant = train.iter().map(|r| f64::from(r.n_redundant)).sum::<f64>() / train.len() as f64;
        Ok(serde_json::json!({ "train_rows": train.len(), "eval_rows": eval.len(), "train_mean_redundant": mean_redundant }))
    })
}

/// Per-row seed of a rollout, derived from the run seed and the rollout's identity.
pub fn rollout_seed(seed: u64, iteration: u32, prompt_id: &str, sample_idx: u32) -> u64 {
    let h = blake3::hash(format!("{seed}/{iteration}/{prompt_id}/{sample_idx}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("a blake3 hash has 32 bytes"))
}

/// `bootstrap`: trains the tiny base policy on the train split's worked solutions, then samples
/// the eval split once to report format-valid rate, accuracy and redundant episodes.
pub fn run_bootstrap(ctx: &Ctx) -> Result<Summary> {
    let cfg = &ctx.config;
    let data = ctx.store.open_ref(&ctx.run, PREPARE_SLOT)?;
    let inputs = vec![data.manifest.as_input("data", &[prompts::TRAIN_FILE, prompts::EVAL_FILE])?];
    execute(ctx, "bootstrap", BOOTSTRAP_VERSION, BOOTSTRAP_SLOT, cfg.stage_params("bootstrap")?, inputs, |staging| {
        let train = prompts::read(&data.file(prompts::TRAIN_FILE)?)?;
        let eval = prompts::read(&data.file(prompts::EVAL_FILE)?)?;
        let tok = tokenizer::train(&solution_corpus(&train), cfg.model.vocab_size)?;
        let eos = tokenizer::required_id(&tok, EOS)?;
        let pad = tokenizer::required_id(&tok, PAD)?;
        let examples = sft_examples(&train, &tok)?;
        let longest = examples.iter().map(|e| e.prompt.len() + e.completion.len()).max().unwrap_or(0);
        if longest > cfg.model.max_position_embeddings {
            bail!("a worked solution needs {longest} tokens, more than model.max_position_embeddings");
        }
        let model_cfg = model::tiny_config(&cfg.model, eos);
        let init = model::init_weights(&model_cfg, cfg.seed, &ctx.device)?;
        let b = &cfg.bootstrap;
        let params = SftParams {
            steps: b.steps,
            batch_size: b.batch_size,
            lr: b.lr,
            warmup_frac: b.warmup_frac,
            weight_decay: b.weight_decay,
            max_grad_norm: 1.0,
            seed: cfg.seed,
        };
        let bar = progress_bar(b.steps as u64, "bootstrap");
        let started = Instant::now();
        let (weights, log) = sft::train(&model_cfg, init, &examples, pad, &params, &ctx.device, |s| {
            bar.set_message(format!("loss {:.3}", s.loss));
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        let train_seconds = started.elapsed().as_secs_f64();
        model::save_checkpoint(staging, &model_cfg, &weights, &tok)?;
        // Evaluate the policy just written, through the same loader every later stage uses.
        let policy = Policy::from_parts(&model_cfg, &weights, tok.clone(), &ctx.device)?;
        let eval_rows: Vec<&PromptRow> = eval.iter().take(b.eval_prompts).collect();
        let figures = eval_figures(ctx, &policy, &eval_rows)?;
        let tokens: usize = log.iter().map(|s| s.tokens).sum();
        let mean_len = |f: fn(&Example) -> usize| examples.iter().map(f).sum::<usize>() as f64 / examples.len() as f64;
        let loss_curve: Vec<f64> = log.iter().step_by((log.len() / 20).max(1)).map(|s| s.loss).collect();
        Ok(serde_json::json!({
            "train_seconds": train_seconds,
            "train_tokens_per_s": tokens as f64 / train_seconds,
            "final_loss": log.last().map(|s| s.loss),
            "mean_prompt_tokens": mean_len(|e| e.prompt.len()),
            "mean_completion_tokens": mean_len(|e| e.completion.len()),
            "loss_curve": loss_curve,
            "eval": figures,
        }))
    })
}

/// Prompt + worked-solution texts: the tokenizer's training corpus.
pub fn solution_corpus(rows: &[PromptRow]) -> Vec<String> {
    rows.iter().map(|r| format!("{}{}", r.prompt, r.solution.as_deref().unwrap_or_default())).collect()
}

/// Supervised examples: the prompt's tokens, then the worked solution's and end-of-sequence.
pub fn sft_examples(rows: &[PromptRow], tok: &tokenizers::Tokenizer) -> Result<Vec<Example>> {
    let eos = tokenizer::required_id(tok, EOS)?;
    rows.iter()
        .map(|r| {
            let Some(solution) = &r.solution else { bail!("train row {}: no worked solution to learn from", r.prompt_id) };
            let mut completion = tokenizer::encode(tok, solution)?;
            completion.push(eos);
            Ok(Example { prompt: tokenizer::encode(tok, &r.prompt)?, completion })
        })
        .collect()
}

/// Samples `rows` once each at the bootstrap's eval temperature and reports the targets.
fn eval_figures(ctx: &Ctx, policy: &Policy, rows: &[&PromptRow]) -> Result<serde_json::Value> {
    let b = &ctx.config.bootstrap;
    let requests: Vec<Request> = rows
        .iter()
        .map(|r| Ok(Request { prompt_ids: tokenizer::encode(&policy.tokenizer, &r.prompt)?, seed: rollout_seed(ctx.config.seed, u32::MAX, &r.prompt_id, 0) }))
        .collect::<Result<_>>()?;
    let params =
        SamplerParams { temperature: b.eval_temperature, top_p: 1.0, max_new_tokens: b.eval_max_new_tokens, ignore_eos: false };
    let started = Instant::now();
    let gens = generate(policy, &requests, &params, ctx.config.sample.batch_rows, |_| {})?;
    let seconds = started.elapsed().as_secs_f64();
    let (mut format_valid, mut correct, mut redundant, mut tokens) = (0usize, 0usize, 0usize, 0usize);
    for (row, g) in rows.iter().zip(&gens) {
        let pieces = tokenizer::decode_pieces(&policy.tokenizer, &g.tokens)?;
        let text = pieces.concat();
        let ends = token_char_ends(&pieces);
        let seg = segment(Rule::Tags, &text, &ends);
        let out = outcome_reward(&text, &row.gold_answer, g.finish, seg.format_ok, 0.0);
        format_valid += usize::from(seg.well_formed && out.answer.is_some());
        correct += usize::from(out.r_out >= 1.0);
        redundant += seg
            .spans
            .iter()
            .filter(|&&span| {
                let (from, to) = span_bytes(&ends, span);
                arith::is_check_episode(&text[from..to])
            })
            .count();
        tokens += g.tokens.len();
    }
    let n = rows.len().max(1) as f64;
    Ok(serde_json::json!({
        "prompts": rows.len(),
        "temperature": b.eval_temperature,
        "format_valid_rate": format_valid as f64 / n,
        "accuracy": correct as f64 / n,
        "mean_redundant_episodes": redundant as f64 / n,
        "mean_response_tokens": tokens as f64 / n,
        "sample_tokens_per_s": tokens as f64 / seconds,
    }))
}

/// The policy an iteration samples with: the base policy for iteration 0, otherwise the policy
/// the previous iteration's update produced.
pub fn iteration_policy(ctx: &Ctx, iteration: u32) -> Result<Artifact> {
    if iteration == 0 {
        ctx.store.open_ref(&ctx.run, BOOTSTRAP_SLOT)
    } else {
        ctx.store.open_ref(&ctx.run, &iter_slot(iteration - 1, "grpo-update"))
    }
}

/// The train-split prompts of an iteration: a seeded shuffle of the split, read in order from a
/// cursor at `iteration * prompts_per_iter`, wrapping around.
pub fn iteration_prompts(train: &[PromptRow], seed: u64, iteration: u32, n: usize) -> Vec<PromptRow> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x6375_7273)); // "curs"
    let cursor = iteration as usize * n;
    (0..n).map(|j| train[order[(cursor + j) % order.len()]].clone()).collect()
}

/// `sample`: G rollouts for each of the iteration's prompts.
pub fn run_sample(ctx: &Ctx, iteration: u32) -> Result<Summary> {
    let cfg = &ctx.config;
    let data = ctx.store.open_ref(&ctx.run, PREPARE_SLOT)?;
    let policy_art = iteration_policy(ctx, iteration)?;
    let mut params = cfg.stage_params("sample")?;
    params["iteration"] = iteration.into();
    let inputs = vec![
        data.manifest.as_input("data", &[prompts::TRAIN_FILE])?,
        policy_art.manifest.as_input("policy", model::CHECKPOINT_FILES)?,
    ];
    execute(ctx, "sample", SAMPLE_VERSION, &iter_slot(iteration, "sample"), params, inputs, |staging| {
        let s = &cfg.sample;
        let train = prompts::read(&data.file(prompts::TRAIN_FILE)?)?;
        if s.prompts_per_iter > train.len() {
            bail!(
                "sample.prompts_per_iter = {} but the train split has only {} prompts (an iteration's prompts must be distinct)",
                s.prompts_per_iter,
                train.len()
            );
        }
        let policy = Policy::load(&policy_art, &ctx.device)?;
        let chosen = iteration_prompts(&train, cfg.seed, iteration, s.prompts_per_iter);
        let mut requests = Vec::with_capacity(chosen.len() * s.group_size);
        let context = policy.cfg.max_position_embeddings;
        for p in &chosen {
            let ids = tokenizer::encode(&policy.tokenizer, &p.prompt)?;
            if ids.len() + s.max_new_tokens > context {
                bail!(
                    "prompt {}: {} tokens + sample.max_new_tokens {} exceed the model's context of {context} tokens",
                    p.prompt_id,
                    ids.len(),
                    s.max_new_tokens
                );
            }
            for g in 0..s.group_size as u32 {
                requests.push(Request { prompt_ids: ids.clone(), seed: rollout_seed(cfg.seed, iteration, &p.prompt_id, g) });
            }
        }
        let sampler = SamplerParams { temperature: s.temperature, top_p: s.top_p, max_new_tokens: s.max_new_tokens, ignore_eos: false };
        let bar = progress_bar(requests.len() as u64, "sample");
        let started = Instant::now();
        let gens = generate(&policy, &requests, &sampler, s.batch_rows, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let mut rows = Vec::with_capacity(gens.len());
        for (i, g) in gens.into_iter().enumerate() {
            let p = &chosen[i / s.group_size];
            let text = tokenizer::decode_pieces(&policy.tokenizer, &g.tokens)?.concat();
            rows.push(RolloutRow {
                iteration,
                prompt_id: p.prompt_id.clone(),
                sample_idx: (i % s.group_size) as u32,
                prompt_token_ids: requests[i].prompt_ids.clone(),
                token_ids: g.tokens,
                text,
                logprobs: g.logprobs,
                finish_reason: g.finish,
                seed: requests[i].seed,
                temperature: s.temperature as f32,
                top_p: s.top_p as f32,
                policy_hash: policy.weights_hash.clone(),
            });
        }
        let generated: usize = rows.iter().map(|r| r.token_ids.len()).sum();
        let truncated = rows.iter().filter(|r| r.finish_reason == FinishReason::Length).count();
        prompts::write(staging, prompts::ITERATION_FILE, &chosen)?;
        rollouts::write(staging, &rows)?;
        Ok(serde_json::json!({
            "rollouts": rows.len(),
            "generated_tokens": generated,
            "mean_response_tokens": generated as f64 / rows.len().max(1) as f64,
            "truncated": truncated,
            "tokens_per_s": generated as f64 / seconds,
        }))
    })
}

/// `segment`: episode spans and the outcome reward of every rollout. `show` prints that many
/// rollouts with their episodes to stderr.
pub fn run_segment(ctx: &Ctx, iteration: u32, show: usize) -> Result<Summary> {
    let cfg = &ctx.config;
    let sample = ctx.store.open_ref(&ctx.run, &iter_slot(iteration, "sample"))?;
    // The tokenizer that produced the rollouts: the policy the sample stage read.
    let policy_input = sample
        .manifest
        .inputs
        .iter()
        .find(|i| i.name == "policy")
        .context("the sample manifest names no policy input")?;
    let policy_art = ctx
        .store
        .entry(&policy_input.key)?
        .with_context(|| format!("the policy {} that sampled iteration {iteration} is gone from the store", store::short(&policy_input.key)))?;
    let inputs = vec![
        sample.manifest.as_input("rollouts", &[prompts::ITERATION_FILE, rollouts::FILE])?,
        policy_art.manifest.as_input("tokenizer", &[model::TOKENIZER_FILE])?,
    ];
    let rule = Rule::parse(&cfg.segment.rule).context("segment.rule")?;
    execute(ctx, "segment", SEGMENT_VERSION, &iter_slot(iteration, "segment"), cfg.stage_params("segment")?, inputs, |staging| {
        let prompt_rows = prompts::read(&sample.file(prompts::ITERATION_FILE)?)?;
        let rollout_rows = rollouts::read(&sample.file(rollouts::FILE)?)?;
        let tok_path = policy_art.file(model::TOKENIZER_FILE)?;
        let tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", tok_path.display()))?;
        let gold: HashMap<&str, &str> = prompt_rows.iter().map(|p| (p.prompt_id.as_str(), p.gold_answer.as_str())).collect();
        let mut rows = Vec::new();
        let (mut format_ok, mut correct) = (0usize, 0usize);
        for (i, r) in rollout_rows.iter().enumerate() {
            let gold = gold
                .get(r.prompt_id.as_str())
                .with_context(|| format!("rollouts.parquet: row {i}: prompt {} is not in prompts.parquet", r.prompt_id))?;
            let pieces = tokenizer::decode_pieces(&tok, &r.token_ids)?;
            let text = pieces.concat();
            if text != r.text {
                bail!("rollouts.parquet: row {i}: the tokenizer's decoding differs from the stored text (mismatched tokenizer)");
            }
            let ends = token_char_ends(&pieces);
            let seg = segment(rule, &text, &ends);
            let out = outcome_reward(&text, gold, r.finish_reason, seg.format_ok, cfg.segment.format_penalty);
            format_ok += usize::from(seg.format_ok);
            correct += usize::from(out.r_out >= 1.0);
            let k = seg.spans.len() as u32;
            for (e, &(start, end)) in seg.spans.iter().enumerate() {
                let (from, to) = span_bytes(&ends, (start, end));
                rows.push(EpisodeRow {
                    iteration,
                    prompt_id: r.prompt_id.clone(),
                    sample_idx: r.sample_idx,
                    episode_idx: e as u32,
                    token_start: start as u32,
                    token_end: end as u32,
                    text: text[from..to].to_string(),
                    rule: cfg.segment.rule.clone(),
                    k,
                    format_ok: seg.format_ok,
                    well_formed: seg.well_formed,
                    answer: out.answer.clone(),
                    grade: out.grade.as_str().into(),
                    excluded: out.excluded,
                    r_out: out.r_out,
                });
            }
        }
        episodes::write(staging, &rows)?;
        let n = rollout_rows.len().max(1) as f64;
        Ok(serde_json::json!({
            "rollouts": rollout_rows.len(),
            "episodes": rows.len(),
            "mean_episodes": rows.len() as f64 / n,
            "format_ok_rate": format_ok as f64 / n,
            "accuracy": correct as f64 / n,
        }))
    })
    .inspect(|_| {
        if show > 0 {
            if let Err(e) = show_rollouts(ctx, iteration, show) {
                eprintln!("warning: cannot show rollouts: {e:#}");
            }
        }
    })
}

/// Prints the first `n` rollouts of an iteration with their episode spans and outcome.
fn show_rollouts(ctx: &Ctx, iteration: u32, n: usize) -> Result<()> {
    let art = ctx.store.open_ref(&ctx.run, &iter_slot(iteration, "segment"))?;
    let rows = episodes::read(&art.file(episodes::FILE)?)?;
    let mut shown = 0;
    let mut current: Option<(String, u32)> = None;
    for r in &rows {
        let id = (r.prompt_id.clone(), r.sample_idx);
        if current.as_ref() != Some(&id) {
            if shown == n {
                break;
            }
            shown += 1;
            eprintln!("--- {} sample {}: K={} grade={} r_out={} answer={:?}", r.prompt_id, r.sample_idx, r.k, r.grade, r.r_out, r.answer);
            current = Some(id);
        }
        eprintln!("  [{}..{}) {}", r.token_start, r.token_end, r.text.replace('\n', "\\n"));
    }
    Ok(())
}
