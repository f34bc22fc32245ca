//! `eval`: a policy of the run on a held-out split or a prompts file (l2t-spec section 9).

use super::sample::rollout_seed;
use super::shard::{execute_sharded, Part, Sharded};
use super::{progress_bar, Ctx, Summary};
use crate::config::Rule;
use crate::eval::{at_budget, summarize, AtBudget, SampleResult};
use crate::model::Policy;
use crate::model::{chat, tokenizer};
use crate::reward::segment::{answer_tokens, outcome_reward_with, reasoning_tokens, segment, token_char_ends};
use crate::sampler::{generate, Request, SamplerParams};
use crate::stage::Stage;
use crate::store::{self, Artifact, InputRef, Staging, EVALS_DIR};
use crate::table::eval_samples::{self, EvalSampleRow};
use crate::table::eval_summary::{self, EvalSummaryRow};
use crate::table::prompts::{self, PromptRow};
use crate::table::rollouts::FinishReason;
use crate::task::answer::extract_answer_with;
use crate::task::grade::{grade_answer, Grade};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The seeds of evaluation samples do not depend on the policy: every policy of a run is
/// evaluated on the same random numbers.
const EVAL_DRAW: u32 = u32::MAX - 1;

/// Which policy of the run to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalPolicy {
    /// The run's base policy (bootstrap).
    Base,
    /// The policy iteration `n`'s update produced.
    Iteration(u32),
}

impl EvalPolicy {
    /// `base` or `iter-NNNN`.
    pub fn name(self) -> String {
        match self {
            Self::Base => "base".into(),
            Self::Iteration(n) => format!("iter-{n:04}"),
        }
    }

    /// Parses `base` or an iteration number.
    pub fn parse(text: &str) -> Result<Self> {
        if text == "base" {
            return Ok(Self::Base);
        }
        let n =
            text.trim_start_matches("iter-").parse().with_context(|| format!("policy {text:?}: expected `base` or an iteration number"))?;
        Ok(Self::Iteration(n))
    }

    fn artifact(self, ctx: &Ctx) -> Result<Artifact> {
        match self {
            Self::Base => ctx.store.open_ref(&ctx.run, Stage::Bootstrap.name()),
            Self::Iteration(n) => ctx.store.open_ref(&ctx.run, &Stage::GrpoUpdate.at(n)),
        }
    }
}

/// What to evaluate on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalPrompts {
    /// A split that `prepare` wrote: `eval` (validation), `test` or `train`.
    Split(String),
    /// A prompts file: Parquet in the prompts schema, or JSONL with at least `prompt_id`,
    /// `prompt` and `gold_answer`.
    File(PathBuf),
}

impl EvalPrompts {
    /// The name used in slots and tables: the split, or the file's stem.
    fn name(&self) -> Result<String> {
        match self {
            Self::Split(s) => Ok(s.clone()),
            Self::File(p) => {
                let stem = p.file_stem().and_then(|s| s.to_str()).with_context(|| format!("{}: no file name", p.display()))?;
                if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    bail!("{}: the file name must be letters, digits, '-', '_' or '.'", p.display());
                }
                Ok(stem.to_string())
            }
        }
    }

    /// The stage input and the rows.
    fn load(&self, ctx: &Ctx) -> Result<(InputRef, Vec<PromptRow>)> {
        match self {
            Self::Split(split) => {
                let file = match split.as_str() {
                    "eval" => prompts::EVAL_FILE,
                    "train" => prompts::TRAIN_FILE,
                    "test" => prompts::TEST_FILE,
                    other => bail!("unknown split {other:?} (expected eval, test or train, or give a prompts file)"),
                };
                let data = ctx.store.open_ref(&ctx.run, Stage::Prepare.name())?;
                Ok((data.manifest.as_input("prompts", &[file])?, prompts::read(&data.file(file)?)?))
            }
            Self::File(path) => {
                let hash = store::hash_file(path)?;
                let rows = if path.extension().is_some_and(|e| e == "jsonl") { read_jsonl(path)? } else { prompts::read(path)? };
                let name = self.name()?;
                let input = InputRef { name: "prompts".into(), key: format!("file:{hash}"), files: BTreeMap::from([(name, hash)]) };
                Ok((input, rows))
            }
        }
    }
}

/// Prompts from JSONL: one object per line with `prompt_id`, `prompt`, `gold_answer` (other
/// prompts-table fields optional).
fn read_jsonl(path: &Path) -> Result<Vec<PromptRow>> {
    #[derive(serde::Deserialize)]
    struct Line {
        prompt_id: String,
        prompt: String,
        gold_answer: String,
        #[serde(default)]
        data_source: String,
        #[serde(default)]
        split: String,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line: Line = serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
            Ok(PromptRow {
                prompt_id: line.prompt_id,
                data_source: line.data_source,
                split: line.split,
                prompt: line.prompt,
                gold_answer: line.gold_answer,
                solution: None,
                n_steps: 0,
                n_redundant: 0,
                n_hard: 0,
            })
        })
        .collect()
}

/// `eval`: `eval.k` samples per prompt at `eval.temperature` / `eval.top_p`, graded; pass@1,
/// unbiased pass@k, tokens, format-valid rate, accuracy at `eval.budgets`, and token efficiency
/// against the base policy (evaluated first, with the same prompts and seeds, when the policy is
/// not the base). Returns the summaries of the stage runs, the base's first.
pub fn run_eval(ctx: &Ctx, target: EvalPolicy, on: &EvalPrompts) -> Result<Vec<Summary>> {
    let cfg = &ctx.config;
    let e = &cfg.eval;
    let split = on.name()?;
    let policy_art = target.artifact(ctx)?;
    let (prompts_input, rows) = on.load(ctx)?;
    let inputs = vec![prompts_input, super::policy_input("policy", &policy_art, false)?];
    let mut summaries = Vec::new();
    // Token efficiency needs the base's summary: the finish reads it (a shard does not).
    let (finish_inputs, base_summary) = match target {
        EvalPolicy::Base => (vec![], None),
        EvalPolicy::Iteration(_) => {
            summaries.extend(run_eval(ctx, EvalPolicy::Base, on)?);
            if matches!(ctx.part, Part::Shard(_)) {
                (vec![], None)
            } else {
                let art = ctx.store.open_ref(&ctx.run, &eval_slot(&split, EvalPolicy::Base))?;
                (
                    vec![art.manifest.as_input("base_eval", &[eval_summary::FILE])?],
                    Some(eval_summary::read(&art.file(eval_summary::FILE)?)?),
                )
            }
        }
    };
    let slot = eval_slot(&split, target);
    // The format-valid rate reads the episodes as `segment` cuts them.
    let rule = cfg.segment.rule;
    let mut params = Stage::Eval.params(cfg);
    params["segment_rule"] = cfg.segment.rule.to_string().into();
    let rows: Vec<PromptRow> = rows.into_iter().take(if e.prompts == 0 { usize::MAX } else { e.prompts }).collect();
    if rows.is_empty() {
        bail!("no prompts to evaluate");
    }
    let job = EvalJob { ctx, target, split, rows, policy: policy_art, rule, base_summary };
    summaries.push(execute_sharded(ctx, Stage::Eval, &slot, params, inputs, finish_inputs, &job)?);
    Ok(summaries)
}

struct EvalJob<'a> {
    ctx: &'a Ctx,
    target: EvalPolicy,
    split: String,
    rows: Vec<PromptRow>,
    policy: Artifact,
    rule: Rule,
    base_summary: Option<EvalSummaryRow>,
}

impl Sharded for EvalJob<'_> {
    /// The graded samples of a range of prompts.
    type Piece = Vec<EvalSampleRow>;

    fn groups(&self) -> Result<usize> {
        Ok(self.rows.len())
    }

    fn compute(&self, groups: Range<usize>) -> Result<Vec<EvalSampleRow>> {
        let (ctx, cfg, e, target, split, rule) = (self.ctx, &self.ctx.config, &self.ctx.config.eval, self.target, &self.split, self.rule);
        let policy_art = &self.policy;
        let rows: Vec<&PromptRow> = self.rows[groups].iter().collect();
        let policy = Policy::load_as(policy_art, &ctx.device, ctx.dtype)?;
        let mut requests = Vec::with_capacity(rows.len() * e.k);
        for p in &rows {
            let ids = chat::prompt_ids(&policy, &cfg.prompt, &p.prompt).with_context(|| format!("prompt {}", p.prompt_id))?;
            for j in 0..e.k as u32 {
                requests.push(Request { prompt_ids: ids.clone(), seed: rollout_seed(cfg.seed, EVAL_DRAW, &p.prompt_id, j) });
            }
        }
        let params = SamplerParams { temperature: e.temperature, top_p: e.top_p, max_new_tokens: e.max_new_tokens, ignore_eos: false };
        let bar = progress_bar(requests.len() as u64, "eval");
        let gens = generate(&policy, &requests, &params, e.batch_rows, |n| bar.inc(n as u64))?;
        bar.finish_and_clear();

        let close = tokenizer::encode(&policy.tokenizer, &cfg.reward.close).context("reward.close")?;
        let mut samples: Vec<EvalSampleRow> = Vec::with_capacity(gens.len());
        let mut forced: Vec<(usize, usize, Request)> = Vec::new(); // (sample, budget index, request)
        for (i, g) in gens.iter().enumerate() {
            let p = rows[i / e.k];
            let pieces = tokenizer::decode_pieces(&policy.tokenizer, &g.tokens)?;
            let text = pieces.concat();
            let ends = token_char_ends(&pieces);
            let seg = segment(rule, &text, &ends);
            let out = outcome_reward_with(&text, &p.gold_answer, g.finish, seg.format_ok, 0.0, e.answer);
            let correct = out.correct;
            let format_valid = seg.well_formed && out.answer.is_some();
            // Cut as `fisher-reward` cuts for `J`: before the response's own `</think>`, never
            // after a final end-of-sequence token (a stopped response's last token).
            let stopped = g.finish == FinishReason::Stop;
            let reasoning_end = reasoning_tokens(&text, &ends, g.tokens.len() - usize::from(stopped));
            let answer_end = answer_tokens(&text, &ends);
            let mut correct_at_budget = vec![0u32; e.budgets.len()];
            for (b, &budget) in e.budgets.iter().enumerate() {
                match at_budget(budget, g.tokens.len(), stopped, answer_end, reasoning_end) {
                    AtBudget::Own => correct_at_budget[b] = u32::from(out.grade == Grade::Correct),
                    AtBudget::Force(cut) => {
                        let prompt_ids = [&requests[i].prompt_ids[..], &g.tokens[..cut], &close[..]].concat();
                        forced.push((i, b, Request { prompt_ids, seed: 0 }));
                    }
                }
            }
            samples.push(EvalSampleRow {
                policy: target.name(),
                split: split.clone(),
                prompt_id: p.prompt_id.clone(),
                sample_idx: (i % e.k) as u32,
                n_tokens: g.tokens.len() as u32,
                finish_reason: g.finish.as_str().into(),
                text,
                answer: out.answer,
                grade: out.grade.as_str().into(),
                correct,
                format_valid,
                correct_at_budget,
            });
        }
        // Cut at a budget: force `close` and read the answer the policy gives greedily.
        if !forced.is_empty() {
            let requests: Vec<Request> = forced.iter().map(|(_, _, r)| r.clone()).collect();
            let greedy = SamplerParams { temperature: 0.0, top_p: 1.0, max_new_tokens: e.answer_tokens, ignore_eos: false };
            let bar = progress_bar(requests.len() as u64, "eval budgets");
            let answers = generate(&policy, &requests, &greedy, e.batch_rows, |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            for ((i, b, _), a) in forced.iter().zip(answers) {
                let text = format!("{}{}", cfg.reward.close, tokenizer::decode_pieces(&policy.tokenizer, &a.tokens)?.concat());
                let gold = &rows[i / e.k].gold_answer;
                let correct = extract_answer_with(&text, e.answer).is_some_and(|ans| grade_answer(&ans, gold) == Grade::Correct);
                samples[*i].correct_at_budget[*b] = u32::from(correct);
            }
        }

        Ok(samples)
    }

    fn write_piece(&self, samples: &Vec<EvalSampleRow>, staging: &mut Staging) -> Result<serde_json::Value> {
        eval_samples::write(staging, samples)?;
        Ok(serde_json::json!({ "samples": samples.len() }))
    }

    fn read_piece(&self, shard: &Artifact) -> Result<Vec<EvalSampleRow>> {
        eval_samples::read(&shard.file(eval_samples::FILE)?)
    }

    fn finish(&self, pieces: Vec<Vec<EvalSampleRow>>, staging: &mut Staging) -> Result<serde_json::Value> {
        let (e, target, split, base_summary) = (&self.ctx.config.eval, self.target, &self.split, &self.base_summary);
        let samples = pieces.concat();
        if samples.len() != self.rows.len() * e.k {
            bail!("the shards hold {} samples, not {} prompts x {}", samples.len(), self.rows.len(), e.k);
        }
        let results: Vec<SampleResult> = samples
            .iter()
            .map(|s| SampleResult {
                n_tokens: s.n_tokens as usize,
                correct: s.correct,
                format_valid: s.format_valid,
                correct_at_budget: s.correct_at_budget.iter().map(|&c| c == 1).collect(),
            })
            .collect();
        let per_prompt: Vec<Vec<SampleResult>> = results.chunks(e.k).map(<[SampleResult]>::to_vec).collect();
        let summary = summarize(&per_prompt, e.k, e.budgets.len());
        let token_efficiency = match &base_summary {
            Some(base) if base.summary.mean_tokens > 0.0 => summary.mean_tokens / base.summary.mean_tokens,
            _ => 1.0,
        };
        eval_samples::write(staging, &samples)?;
        let row = EvalSummaryRow {
            policy: target.name(),
            split: split.clone(),
            summary: summary.clone(),
            token_efficiency,
            budgets: e.budgets.iter().map(|&b| b as u32).collect(),
        };
        eval_summary::write(staging, &row)?;
        let mut metrics = serde_json::to_value(&summary)?;
        metrics["token_efficiency"] = token_efficiency.into();
        metrics["budgets"] = serde_json::json!(e.budgets);
        Ok(metrics)
    }
}

/// `evals/<split>/<policy>`.
pub fn eval_slot(split: &str, target: EvalPolicy) -> String {
    format!("{EVALS_DIR}{split}/{}", target.name())
}

/// The figures of an evaluation the run has published.
pub fn read_eval_summary(ctx: &Ctx, on: &EvalPrompts, target: EvalPolicy) -> Result<EvalSummaryRow> {
    let art = ctx.store.open_ref(&ctx.run, &eval_slot(&on.name()?, target))?;
    eval_summary::read(&art.file(eval_summary::FILE)?)
}

/// The newest policy of the run: the last update's, or the base policy before any.
pub fn latest_policy(ctx: &Ctx) -> EvalPolicy {
    let next = crate::audit::next_iteration(&ctx.store, &ctx.run);
    if next == 0 {
        EvalPolicy::Base
    } else {
        EvalPolicy::Iteration(next - 1)
    }
}
