//! `sample` (G rollouts per prompt) and `segment` (episodes and the outcome reward).

use crate::stage::Stage;
use super::{data_cursor, execute, iteration_policy, iteration_prompts, policy_input, progress_bar, Ctx, Summary};
use super::setup::rollout_seed;
use super::shard::{execute_sharded, Sharded};
use crate::model::{chat, tokenizer};
use crate::model::{self, Policy};
use crate::reward::segment::{outcome_reward, segment, span_bytes, token_char_ends};
use crate::sample::{generate, Request, SamplerParams};
use crate::store::{self, Artifact, Staging};
use crate::table::episodes::{self, EpisodeRow};
use crate::table::prompts::{self, PromptRow};
use crate::table::rollouts::{self, FinishReason, RolloutRow};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// `sample`: G rollouts for each of the iteration's prompts (or one shard of the prompts, or the
/// merge of the shards: [`super::shard`]).
pub fn run_sample(ctx: &Ctx, iteration: u32) -> Result<Summary> {
    let data = ctx.store.open_ref(&ctx.run, Stage::Prepare.name())?;
    let policy = iteration_policy(ctx, iteration)?;
    let mut params = Stage::Sample.params(&ctx.config);
    params["iteration"] = iteration.into();
    let cursor = data_cursor(&policy)?;
    let inputs = vec![data.manifest.as_input("data", &[prompts::TRAIN_FILE])?, policy_input("policy", &policy, true)?];
    let job = SampleJob { ctx, iteration, data, policy, cursor };
    execute_sharded(ctx, Stage::Sample, &Stage::Sample.at(iteration), params, inputs, vec![], &job)
}

struct SampleJob<'a> {
    ctx: &'a Ctx,
    iteration: u32,
    data: Artifact,
    policy: Artifact,
    cursor: usize,
}

/// The rollouts of a range of the iteration's prompts.
struct Rollouts {
    prompts: Vec<PromptRow>,
    rows: Vec<RolloutRow>,
    seconds: f64,
}

impl Sharded for SampleJob<'_> {
    type Piece = Rollouts;

    fn groups(&self) -> Result<usize> {
        Ok(self.ctx.config.sample.prompts_per_iter)
    }

    fn compute(&self, groups: Range<usize>) -> Result<Rollouts> {
        let cfg = &self.ctx.config;
        let s = &cfg.sample;
        let train = prompts::read(&self.data.file(prompts::TRAIN_FILE)?)?;
        if s.prompts_per_iter > train.len() {
            bail!(
                "sample.prompts_per_iter = {} but the train split has only {} prompts (an iteration's prompts must be distinct)",
                s.prompts_per_iter,
                train.len()
            );
        }
        let chosen = iteration_prompts(&train, cfg.seed, self.cursor, s.prompts_per_iter)[groups].to_vec();
        let policy = Policy::load(&self.policy, &self.ctx.device)?;
        let mut requests = Vec::with_capacity(chosen.len() * s.group_size);
        let context = policy.cfg.max_position_embeddings;
        for p in &chosen {
            let ids = chat::prompt_ids(&policy, &cfg.prompt, &p.prompt).with_context(|| format!("prompt {}", p.prompt_id))?;
            if ids.len() + s.max_new_tokens > context {
                bail!(
                    "prompt {}: {} tokens + sample.max_new_tokens {} exceed the model's context of {context} tokens",
                    p.prompt_id,
                    ids.len(),
                    s.max_new_tokens
                );
            }
            for g in 0..s.group_size as u32 {
                requests.push(Request { prompt_ids: ids.clone(), seed: rollout_seed(cfg.iteration_seed(), self.iteration, &p.prompt_id, g) });
            }
        }
        let sampler = SamplerParams { temperature: s.temperature, top_p: s.top_p, max_new_tokens: s.max_new_tokens, ignore_eos: false };
        let bar = progress_bar(requests.len() as u64, Stage::Sample.name());
        let started = Instant::now();
        let gens = generate(&policy, &requests, &sampler, s.batch_rows, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let mut rows = Vec::with_capacity(gens.len());
        for (i, g) in gens.into_iter().enumerate() {
            let p = &chosen[i / s.group_size];
            let text = tokenizer::decode_pieces(&policy.tokenizer, &g.tokens)?.concat();
            rows.push(RolloutRow {
                iteration: self.iteration,
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
        Ok(Rollouts { prompts: chosen, rows, seconds })
    }

    fn write_piece(&self, piece: &Rollouts, staging: &mut Staging) -> Result<serde_json::Value> {
        prompts::write(staging, prompts::ITERATION_FILE, &piece.prompts)?;
        rollouts::write(staging, &piece.rows)?;
        Ok(serde_json::json!({ "rollouts": piece.rows.len(), "sample_seconds": piece.seconds }))
    }

    fn read_piece(&self, shard: &Artifact) -> Result<Rollouts> {
        Ok(Rollouts {
            prompts: prompts::read(&shard.file(prompts::ITERATION_FILE)?)?,
            rows: rollouts::read(&shard.file(rollouts::FILE)?)?,
            seconds: shard.manifest.metrics["sample_seconds"].as_f64().unwrap_or(f64::NAN),
        })
    }

    fn finish(&self, pieces: Vec<Rollouts>, staging: &mut Staging) -> Result<serde_json::Value> {
        let seconds: f64 = pieces.iter().map(|p| p.seconds).sum();
        let (mut chosen, mut rows) = (Vec::new(), Vec::new());
        for piece in pieces {
            chosen.extend(piece.prompts);
            rows.extend(piece.rows);
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
            "data_cursor": self.cursor,
        }))
    }
}

/// `segment`: episode spans and the outcome reward of every rollout. `show` prints that many
/// rollouts with their episodes to stderr.
pub fn run_segment(ctx: &Ctx, iteration: u32, show: usize) -> Result<Summary> {
    let cfg = &ctx.config;
    let sample = ctx.store.open_ref(&ctx.run, &Stage::Sample.at(iteration))?;
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
    let rule = cfg.segment.rule;
    execute(ctx, Stage::Segment, &Stage::Segment.at(iteration), Stage::Segment.params(cfg), inputs, |staging| {
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
            correct += usize::from(out.correct);
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
                    rule: cfg.segment.rule.to_string(),
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
    let art = ctx.store.open_ref(&ctx.run, &Stage::Segment.at(iteration))?;
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
