//! `credit-assign`: episode rewards, token credit and group advantages (or a baseline's).

use super::{check_same_ids, episodes_by_rollout, execute, Ctx, Summary};
use crate::reward::episode_reward;
use crate::reward::segment::episode_solved;
use crate::stage::Stage;
use crate::table::advantages::{self, AdvantageRow};
use crate::table::episode_rewards;
use crate::table::episodes::{self, EpisodeRow};
use crate::table::prompts::{self, PromptRow};
use crate::table::rollouts::{self, RolloutRow};
use crate::train::credit::{assign_iteration, Group, RolloutSignal};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// `credit-assign`: episode rewards `R(i,k)` (spec 6), then per-token credit (spec 7), per group.
/// `show` prints that many rollouts with their episodes, rewards and advantages.
pub fn run_credit_assign(ctx: &Ctx, iteration: u32, show: usize) -> Result<Summary> {
    let cfg = &ctx.config;
    let sample = ctx.store.open_ref(&ctx.run, &Stage::Sample.at(iteration))?;
    let seg = ctx.store.open_ref(&ctx.run, &Stage::Segment.at(iteration))?;
    let rewards = ctx.store.open_ref(&ctx.run, &Stage::FisherReward.at(iteration))?;
    let inputs = vec![
        sample.manifest.as_input("rollouts", &[prompts::ITERATION_FILE, rollouts::FILE])?,
        seg.manifest.as_input("episodes", &[episodes::FILE])?,
        rewards.manifest.as_input("episode_rewards", &[episode_rewards::FILE])?,
    ];
    let c = &cfg.credit;
    let slot = Stage::CreditAssign.at(iteration);
    let summary = execute(ctx, Stage::CreditAssign, &slot, Stage::CreditAssign.params(cfg), inputs, |staging| {
        let prompt_rows = prompts::read(&sample.file(prompts::ITERATION_FILE)?)?;
        let rollout_rows = rollouts::read(&sample.file(rollouts::FILE)?)?;
        let episode_rows = episodes::read(&seg.file(episodes::FILE)?)?;
        let reward_rows = episode_rewards::read(&rewards.file(episode_rewards::FILE)?)?;
        let by_rollout = episodes_by_rollout(&rollout_rows, &episode_rows)?;
        let episode_id = |p: &str, s: u32, k: u32| (p.to_string(), s, k);
        let expected: Vec<_> = episode_rows.iter().map(|e| episode_id(&e.prompt_id, e.sample_idx, e.episode_idx)).collect();
        let got: Vec<_> = reward_rows.iter().map(|e| episode_id(&e.prompt_id, e.sample_idx, e.episode_idx)).collect();
        check_same_ids(episode_rewards::FILE, "episode (prompt, sample, episode)", &expected, &got)?;

        let groups = groups_by_prompt(&prompt_rows, &rollout_rows)?;

        let mut first_reward = 0;
        let reward_offsets: Vec<usize> = by_rollout
            .iter()
            .map(|eps| {
                let at = first_reward;
                first_reward += eps.len();
                at
            })
            .collect();
        let signal = |i: usize| -> RolloutSignal {
            let eps: &[EpisodeRow] = by_rollout[i];
            let k_i = eps.len();
            let r_out = f64::from(eps[0].r_out);
            let rewards = &reward_rows[reward_offsets[i]..reward_offsets[i] + k_i];
            RolloutSignal {
                logp_old: rollout_rows[i].logprobs.clone(),
                spans: eps.iter().map(|e| (e.token_start as usize, e.token_end as usize)).collect(),
                episode_rewards: rewards.iter().map(|rw| episode_reward(r_out, k_i, rw.d_i, rw.c_scaled, c.alpha, c.beta)).collect(),
                d_i: rewards.iter().map(|rw| rw.d_i).collect(),
                r_out,
                correct: episode_solved(&eps[0], rollout_rows[i].finish_reason),
            }
        };
        let iteration_groups: Vec<Group> = groups
            .iter()
            .map(|members| Group { signals: members.iter().map(|&i| signal(i)).collect(), excluded: by_rollout[members[0]][0].excluded })
            .collect();
        let (assigned, stats) = assign_iteration(&iteration_groups, &cfg.credit);
        let mut rows: Vec<Option<AdvantageRow>> = vec![None; rollout_rows.len()];
        for ((members, group), (credits, zero_std)) in groups.iter().zip(&iteration_groups).zip(assigned) {
            for ((&i, credit), sig) in members.iter().zip(credits).zip(&group.signals) {
                let r = &rollout_rows[i];
                let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                rows[i] = Some(AdvantageRow {
                    iteration,
                    prompt_id: r.prompt_id.clone(),
                    sample_idx: r.sample_idx,
                    method: cfg.credit.method.to_string(),
                    r_episode: to_f32(&sig.episode_rewards),
                    w: to_f32(&credit.w),
                    r_t: to_f32(&credit.r_t),
                    a_t: to_f32(&credit.a_t),
                    rbar: credit.rbar,
                    a_i: credit.a_i,
                    n_clipped: credit.n_clipped as u32,
                    guard_binds: credit.guard_binds,
                    zero_std,
                    excluded: group.excluded,
                });
            }
        }
        let rows: Vec<AdvantageRow> = rows.into_iter().collect::<Option<_>>().context("a rollout belongs to no prompt group")?;
        if let Some(bad) = rows.iter().position(|r| !r.rbar.is_finite() || !r.a_i.is_finite() || r.a_t.iter().any(|a| !a.is_finite())) {
            bail!("rollout {bad}: a non-finite advantage");
        }
        advantages::write(staging, &rows)?;
        let n = rows.len().max(1) as f64;
        Ok(serde_json::json!({
            "rollouts": rows.len(),
            "method": cfg.credit.method,
            "token_scale": cfg.credit.token_scale,
            "frac_zero_std": stats.zero_std_groups as f64 / stats.groups.max(1) as f64,
            "frac_guard_binds": stats.guarded as f64 / stats.signal_rollouts.max(1) as f64,
            "frac_inverted": stats.inverted as f64 / stats.signal_rollouts.max(1) as f64,
            "excluded_groups": stats.excluded_groups,
            "clipped_tokens": stats.clipped_tokens,
            "clip_frac": stats.clipped_tokens as f64 / stats.tokens.max(1) as f64,
            "mean_rbar": rows.iter().map(|r| r.rbar).sum::<f64>() / n,
            "mean_r_out": by_rollout.iter().map(|e| f64::from(e[0].r_out)).sum::<f64>() / n,
            "mean_abs_a_t": rows.iter().flat_map(|r| r.a_t.iter().map(|a| f64::from(a.abs()))).sum::<f64>() / stats.tokens.max(1) as f64,
        }))
    })?;
    if show > 0 {
        if let Err(e) = show_credit(ctx, iteration, show) {
            eprintln!("warning: cannot show rollouts: {e:#}");
        }
    }
    Ok(summary)
}

/// The groups of an iteration: the rollout indices of each of its prompts, in prompt order. A
/// prompt without rollouts (an empty group) or a rollout of another prompt is refused.
pub fn groups_by_prompt(prompt_rows: &[PromptRow], rollout_rows: &[RolloutRow]) -> Result<Vec<Vec<usize>>> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); prompt_rows.len()];
    let index: HashMap<&str, usize> = prompt_rows.iter().enumerate().map(|(i, p)| (p.prompt_id.as_str(), i)).collect();
    for (i, r) in rollout_rows.iter().enumerate() {
        let g = index
            .get(r.prompt_id.as_str())
            .with_context(|| format!("{}: row {i}: prompt {} is not in {}", rollouts::FILE, r.prompt_id, prompts::ITERATION_FILE))?;
        groups[*g].push(i);
    }
    if let Some(empty) = groups.iter().position(Vec::is_empty) {
        bail!("{}: prompt {} has an empty group (no rollouts)", prompts::ITERATION_FILE, prompt_rows[empty].prompt_id);
    }
    Ok(groups)
}

/// Prints the first `n` rollouts of an iteration: each episode with `dI`, `C`, `R` and its
/// mean token advantage.
fn show_credit(ctx: &Ctx, iteration: u32, n: usize) -> Result<()> {
    let open = |stage: Stage| ctx.store.open_ref(&ctx.run, &stage.at(iteration));
    let eps = episodes::read(&open(Stage::Segment)?.file(episodes::FILE)?)?;
    let rewards = episode_rewards::read(&open(Stage::FisherReward)?.file(episode_rewards::FILE)?)?;
    let adv = advantages::read(&open(Stage::CreditAssign)?.file(advantages::FILE)?)?;
    let mut at = 0;
    for a in adv.iter().take(n) {
        eprintln!("--- {} sample {}: rbar={:+.4} A_i={:+.3}", a.prompt_id, a.sample_idx, a.rbar, a.a_i);
        while at < eps.len() && eps[at].prompt_id == a.prompt_id && eps[at].sample_idx == a.sample_idx {
            let (e, rw) = (&eps[at], &rewards[at]);
            let span = &a.a_t[e.token_start as usize..e.token_end as usize];
            let mean_a = span.iter().sum::<f32>() / span.len().max(1) as f32;
            eprintln!(
                "  k={} dI={:+.4} C={:.3} R={:+.4} mean A_t={:+.3}  {}",
                e.episode_idx,
                rw.d_i,
                rw.c_scaled,
                a.r_episode[e.episode_idx as usize],
                mean_a,
                e.text.replace('\n', "\\n")
            );
            at += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str) -> PromptRow {
        PromptRow {
            prompt_id: id.into(),
            data_source: "t".into(),
            split: "train".into(),
            prompt: String::new(),
            gold_answer: "1".into(),
            solution: None,
            n_steps: 1,
            n_redundant: 0,
            n_hard: 0,
        }
    }

    #[test]
    fn groups_follow_prompt_order_and_an_empty_group_is_refused() {
        let r = |p: &str, s| super::super::tests::rollout(p, s, 2);
        let groups = groups_by_prompt(&[prompt("a"), prompt("b")], &[r("b", 0), r("a", 0), r("b", 1)]).unwrap();
        assert_eq!(groups, vec![vec![1], vec![0, 2]]);
        let err = format!("{:#}", groups_by_prompt(&[prompt("a"), prompt("b")], &[r("a", 0)]).unwrap_err());
        assert!(err.contains("prompt b has an empty group"), "{err}");
        let err = format!("{:#}", groups_by_prompt(&[prompt("a")], &[r("c", 0)]).unwrap_err());
        assert!(err.contains("row 0: prompt c is not in"), "{err}");
    }
}
