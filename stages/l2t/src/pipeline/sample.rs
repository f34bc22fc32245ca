//! `sample`: G rollouts per prompt, with per-token log-probs and finish reasons.

use super::shard::{execute_sharded, Sharded};
use super::{data_cursor, iteration_policy, iteration_prompts, policy_input, progress_bar, Ctx, Summary};
use crate::model::Policy;
use crate::model::{chat, tokenizer};
use crate::sampler::{generate, Request, SamplerParams};
use crate::stage::Stage;
use crate::store::{Artifact, Staging};
use crate::table::prompts::{self, PromptRow};
use crate::table::rollouts::{self, FinishReason, RolloutRow};
use anyhow::{bail, Context, Result};
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
        let policy = Policy::load_as(&self.policy, &self.ctx.device, self.ctx.dtype)?;
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
                requests
                    .push(Request { prompt_ids: ids.clone(), seed: rollout_seed(cfg.iteration_seed(), self.iteration, &p.prompt_id, g) });
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
        Ok(serde_json::to_value(ShardMetrics { rollouts: piece.rows.len(), sample_seconds: piece.seconds })?)
    }

    fn read_piece(&self, shard: &Artifact) -> Result<Rollouts> {
        let metrics: ShardMetrics = serde_json::from_value(shard.manifest.metrics.clone())
            .with_context(|| format!("shard {}: manifest metrics", crate::store::short(&shard.manifest.key)))?;
        Ok(Rollouts {
            prompts: prompts::read(&shard.file(prompts::ITERATION_FILE)?)?,
            rows: rollouts::read(&shard.file(rollouts::FILE)?)?,
            seconds: metrics.sample_seconds,
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

/// What a shard of `sample` records in its manifest; the merge reads it back.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ShardMetrics {
    rollouts: usize,
    /// The shard's sampling time (the merged run reports the shards' total tokens per second).
    sample_seconds: f64,
}

/// Per-row seed of a rollout, derived from the run seed and the rollout's identity.
pub fn rollout_seed(seed: u64, iteration: u32, prompt_id: &str, sample_idx: u32) -> u64 {
    crate::config::seed_of(&format!("{seed}/{iteration}/{prompt_id}/{sample_idx}"))
}
