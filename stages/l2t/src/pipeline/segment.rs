//! `segment`: episode spans and the outcome reward of every rollout.

use super::{execute, Ctx, Summary};
use crate::model;
use crate::model::tokenizer;
use crate::reward::segment::{outcome_reward, segment, span_bytes, token_char_ends};
use crate::stage::Stage;
use crate::store;
use crate::table::episodes::{self, EpisodeRow};
use crate::table::prompts;
use crate::table::rollouts;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// `segment`: episode spans and the outcome reward of every rollout. `show` prints that many
/// rollouts with their episodes to stderr.
pub fn run_segment(ctx: &Ctx, iteration: u32, show: usize) -> Result<Summary> {
    let cfg = &ctx.config;
    let sample = ctx.store.open_ref(&ctx.run, &Stage::Sample.at(iteration))?;
    // The tokenizer that produced the rollouts: the policy the sample stage read.
    let policy_input = sample.manifest.inputs.iter().find(|i| i.name == "policy").context("the sample manifest names no policy input")?;
    let policy_art = ctx.store.entry(&policy_input.key)?.with_context(|| {
        format!("the policy {} that sampled iteration {iteration} is gone from the store", store::short(&policy_input.key))
    })?;
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
