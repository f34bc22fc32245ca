//! `grpo-update`: the policy of iteration n+1 from iteration n's rollouts and advantages.

use super::{
    check_same_ids, check_sampled_by, data_cursor, execute, iteration_policy, policy_input, progress_bar, rollout_ids, Ctx, Summary,
};
use crate::model::{self, response_logprobs, Policy};
use crate::stage::Stage;
use crate::table::advantages::{self, AdvantageRow};
use crate::table::prompts;
use crate::table::rollouts::{self, RolloutRow};
use crate::table::update_metrics::{self, StepMetrics, UpdateMetricsRow};
use crate::train::checkpoint::{self, RngState, TrainerState};
use crate::train::grpo::{self, GrpoParams, Sequence};
use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Sequences scored together by the no-gradient passes (reference and recomputed log-probs).
const SCORE_ROWS: usize = 16;

/// `grpo-update`: `ppo_epochs x minibatches` AdamW steps on the clipped surrogate with the k3 KL
/// to the base policy (l2t-spec 8). Writes the next policy as a Hugging Face directory plus the
/// optimizer moments and trainer state, and the `update_metrics` table.
pub fn run_grpo_update(ctx: &Ctx, iteration: u32) -> Result<Summary> {
    let cfg = &ctx.config;
    let u = &cfg.update;
    let sample = ctx.store.open_ref(&ctx.run, &Stage::Sample.at(iteration))?;
    let credit = ctx.store.open_ref(&ctx.run, &Stage::CreditAssign.at(iteration))?;
    let policy_art = iteration_policy(ctx, iteration)?;
    let base_art = ctx.store.open_ref(&ctx.run, Stage::Bootstrap.name())?;
    let mut inputs = vec![
        sample.manifest.as_input("rollouts", &[prompts::ITERATION_FILE, rollouts::FILE])?,
        credit.manifest.as_input("advantages", &[advantages::FILE])?,
        policy_input("policy", &policy_art, true)?,
    ];
    if u.beta_kl > 0.0 {
        inputs.push(policy_input("base", &base_art, false)?);
    }
    let slot = Stage::GrpoUpdate.at(iteration);
    execute(ctx, Stage::GrpoUpdate, &slot, Stage::GrpoUpdate.params(cfg), inputs, |staging| {
        let stage_started = Instant::now();
        let prompt_rows = prompts::read(&sample.file(prompts::ITERATION_FILE)?)?;
        let rollout_rows = rollouts::read(&sample.file(rollouts::FILE)?)?;
        let adv_rows = advantages::read(&credit.file(advantages::FILE)?)?;
        let adv_ids: Vec<(String, u32)> = adv_rows.iter().map(|a| (a.prompt_id.clone(), a.sample_idx)).collect();
        check_same_ids(advantages::FILE, "rollout (prompt, sample)", &rollout_ids(&rollout_rows), &adv_ids)?;
        for (i, (r, a)) in rollout_rows.iter().zip(&adv_rows).enumerate() {
            if a.a_t.len() != r.token_ids.len() {
                bail!("{}: row {i}: {} token advantages for a response of {} tokens", advantages::FILE, a.a_t.len(), r.token_ids.len());
            }
        }
        let policy = Policy::load_for_update(&policy_art, &ctx.device)?;
        check_sampled_by(&policy, &rollout_rows, iteration)?;
        let pad = policy.pad_id;

        let included: Vec<(&RolloutRow, &AdvantageRow)> = rollout_rows.iter().zip(&adv_rows).filter(|(_, a)| !a.excluded).collect();
        let mut seqs: Vec<Sequence> = included
            .iter()
            .map(|&(r, a)| Sequence {
                prompt: r.prompt_token_ids.clone(),
                response: r.token_ids.clone(),
                logp_old: r.logprobs.clone(),
                logp_ref: Vec::new(),
                a_t: a.a_t.clone(),
            })
            .collect();
        if seqs.is_empty() {
            bail!("every rollout of iteration {iteration} is excluded (unparsable gold answers): nothing to train on");
        }
        let pairs: Vec<(&[u32], &[u32])> = included.iter().map(|(r, _)| (r.prompt_token_ids.as_slice(), r.token_ids.as_slice())).collect();
        // The sampler's log-probs are the ratio's denominator when it ran in f32 (they match the
        // trainer's to the order of its sums), and no pass recomputes them unless asked to audit
        // the mismatch. From a sampler in another precision (bf16) the update takes its own f32
        // log-probs instead, recording the mismatch.
        let sampled_in_f32 = sample.manifest.dtype == "f32";
        let recomputed =
            if sampled_in_f32 && !u.audit_logp_old { None } else { Some(response_logprobs(&policy.model, &pairs, pad, SCORE_ROWS)?) };
        let (mismatch_mean, mismatch_max) = match &recomputed {
            Some(recomputed) => {
                let diffs: Vec<f64> = seqs
                    .iter()
                    .zip(recomputed)
                    .flat_map(|(s, r)| s.logp_old.iter().zip(r).map(|(a, b)| f64::from((a - b).abs())))
                    .collect();
                (Some(diffs.iter().sum::<f64>() / diffs.len().max(1) as f64), Some(diffs.iter().copied().fold(0.0, f64::max)))
            }
            None => (None, None),
        };
        if let (false, Some(recomputed)) = (sampled_in_f32, &recomputed) {
            seqs.iter_mut().zip(recomputed).for_each(|(s, r)| s.logp_old.clone_from(r));
        }
        // The batch's loss under the policy before the update: its own log-probs where scored.
        let current: Vec<Vec<f32>> = match recomputed {
            Some(recomputed) => recomputed,
            None => seqs.iter().map(|s| s.logp_old.clone()).collect(),
        };
        if u.beta_kl > 0.0 {
            let base = Policy::load(&base_art, &ctx.device)?;
            if base.tokenizer_hash != policy.tokenizer_hash {
                bail!("the base policy's tokenizer differs from the policy's: the KL to the base needs one vocabulary");
            }
            let reference = response_logprobs(&base.model, &pairs, pad, SCORE_ROWS)?;
            seqs.iter_mut().zip(reference).for_each(|(s, r)| s.logp_ref = r);
        }

        let previous = checkpoint::load_trainer_state(&policy_art)?;
        let names: Vec<String> = policy.weights.keys().cloned().collect();
        let optimizer = checkpoint::load_optimizer(&policy_art, &names, &ctx.device)?;
        let mut rng = match &previous {
            Some(state) => state.rng.restore()?,
            None => ChaCha8Rng::seed_from_u64(cfg.iteration_seed() ^ 0x6772_706f), // "grpo"
        };
        let params = GrpoParams { update: *u, max_new_tokens: cfg.sample.max_new_tokens };
        if previous.as_ref().is_some_and(|p| p.optimizer_step >= params.planned_steps()) {
            eprintln!("warning: iteration {iteration} is past update.planned_iterations; the cosine schedule is at its floor (update.min_lr_ratio)");
        }
        let loss_before = grpo::batch_loss(&seqs, &current, &params);
        let prepare_seconds = stage_started.elapsed().as_secs_f64();
        // The update copies the weights into its variables: the policy's own copy (and the model
        // over it) go first, so that the weights are never held twice.
        let Policy { cfg: policy_cfg, model: policy_model, weights: policy_weights, tokenizer, tokenizer_config, .. } = policy;
        drop(policy_model);
        let bar = progress_bar((u.ppo_epochs * u.minibatches.min(seqs.len())) as u64, Stage::GrpoUpdate.name());
        let started = Instant::now();
        let (weights, state, log) =
            grpo::update(&policy_cfg, policy_weights, optimizer, &seqs, &params, pad, &mut rng, &ctx.device, |m| {
                bar.set_message(format!("loss {:+.4} kl {:.2e}", m.loss, m.kl));
                bar.inc(1);
            })?;
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        let loss_after = if u.loss_after {
            let mut updated = model::build_model(&policy_cfg, &weights, &ctx.device)?;
            updated.pack_for_inference()?;
            Some(grpo::batch_loss(&seqs, &response_logprobs(&updated, &pairs, pad, SCORE_ROWS)?, &params))
        } else {
            None
        };

        let saving = Instant::now();
        model::save_checkpoint(staging, &policy_cfg, &weights, &tokenizer, &tokenizer_config)?;
        checkpoint::save_optimizer(staging, &names, &state)?;
        let trainer = TrainerState {
            iteration,
            optimizer_step: state.step,
            planned_steps: params.planned_steps(),
            data_cursor: data_cursor(&policy_art)? + prompt_rows.len(),
            rng: RngState::capture(&rng),
        };
        checkpoint::save_trainer_state(staging, &trainer)?;
        let rows: Vec<UpdateMetricsRow> = log
            .iter()
            .map(|&step| UpdateMetricsRow { iteration, step, logp_mismatch_mean: mismatch_mean, logp_mismatch_max: mismatch_max })
            .collect();
        update_metrics::write(staging, &rows)?;
        let save_seconds = saving.elapsed().as_secs_f64();
        let steps = log.len().max(1) as f64;
        let mean = |f: fn(&StepMetrics) -> f64| log.iter().map(f).sum::<f64>() / steps;
        let tokens: u64 = log.iter().map(|m| m.tokens).sum();
        Ok(serde_json::json!({
            "sequences": seqs.len(),
            "steps": log.len(),
            "optimizer_step": state.step,
            "mean_loss": mean(|m| m.loss),
            "batch_loss_before": loss_before,
            "batch_loss_after": loss_after,
            "mean_kl": mean(|m| m.kl),
            "mean_clip_frac": mean(|m| m.clip_frac),
            "mean_grad_norm": mean(|m| m.grad_norm),
            "last_lr": log.last().map(|m| m.lr),
            "tensors_with_grad": log.last().map(|m| m.tensors_with_grad),
            "tensors": names.len(),
            "logp_mismatch_mean": mismatch_mean,
            "logp_mismatch_max": mismatch_max,
            "logp_old": if sampled_in_f32 { "sampler" } else { "recomputed in f32" },
            "train_tokens_per_s": tokens as f64 / seconds,
            // Where the stage's time goes: loading the policy and optimizer and the passes before
            // the update, the update itself, writing the checkpoint (publishing is on top).
            "phase_seconds": { "prepare": prepare_seconds, "update": seconds, "save": save_seconds },
            "data_cursor": trainer.data_cursor,
        }))
    })
}
