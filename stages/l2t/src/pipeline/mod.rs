//! One module per stage, named after it, each with the function its binary runs: resolve the
//! inputs through the run's refs, compute the stage key, reuse or compute the outputs, publish the
//! ref, and return a one-line summary. What they share (the context, the cache-or-compute step,
//! the policy of an iteration, the data cursor) is here; sharding is in [`shard`].

mod bootstrap;
mod credit_assign;
mod eval;
mod fisher_reward;
mod grpo_update;
mod prepare;
mod sample;
mod segment;
mod shard;

pub use bootstrap::{eval_figures, run_bootstrap, sft_examples, solution_corpus};
pub use credit_assign::run_credit_assign;
pub use eval::{eval_slot, latest_policy, read_eval_summary, run_eval, EvalPolicy, EvalPrompts};
pub use fisher_reward::run_fisher_reward;
pub use grpo_update::run_grpo_update;
pub use prepare::run_prepare;
pub use sample::{rollout_seed, run_sample};
pub use segment::run_segment;
pub use shard::{Part, Shard, ShardArgs};

use crate::config::Config;
use crate::model::{self, tokenizer, Policy};
use crate::stage::Stage;
use crate::store::{self, stage_key, Artifact, Backend, Claim, InputRef, Manifest, Outcome, Staging, Store};
use crate::table::episodes::{self, EpisodeRow};
use crate::table::prompts::PromptRow;
use crate::table::rollouts::{self, RolloutRow};
use crate::train::checkpoint;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

/// What every stage needs: where the store is, which run, the configuration.
pub struct Ctx {
    pub store: Store,
    pub run: String,
    pub config: Config,
    pub device: Device,
    /// The precision of the policy's passes (f32 on the CPU; part of every key with the device).
    pub dtype: DType,
    /// The whole stage run, or one shard of it, or the merge of its shards ([`shard`]).
    pub part: Part,
    /// Take a cache hit or fail with [`NotCached`]; never compute.
    pub only_cached: bool,
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
        Ok(Self {
            store: Store::new(artifacts),
            run: run.to_string(),
            device: crate::kernels::open_device(config.device)?,
            dtype: config.dtype.dtype(),
            config,
            part: Part::Whole,
            only_cached: false,
        })
    }

    /// The device and dtype this context computes on, as keys and manifests record them.
    pub fn backend(&self) -> Backend {
        Backend::of(&self.device, self.dtype)
    }
}

/// The error of a stage asked `--only-cached` whose key is not in the store.
#[derive(Debug)]
pub struct NotCached(pub String);

impl std::fmt::Display for NotCached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key {} is not in the store (--only-cached computes nothing)", self.0)
    }
}

impl std::error::Error for NotCached {}

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

/// Runs one stage of an iteration as its binary does (printing no rollouts): how `compare` and
/// the bench chain an iteration in one process.
pub fn run_iteration_stage(ctx: &Ctx, stage: Stage, iteration: u32) -> Result<Summary> {
    match stage {
        Stage::Sample => run_sample(ctx, iteration),
        Stage::Segment => run_segment(ctx, iteration, 0),
        Stage::FisherReward => run_fisher_reward(ctx, iteration),
        Stage::CreditAssign => run_credit_assign(ctx, iteration, 0),
        Stage::GrpoUpdate => run_grpo_update(ctx, iteration),
        other => bail!("{other} is not a stage of an iteration"),
    }
}

/// Reuses or computes one stage run and points the run's ref at it.
fn execute(
    ctx: &Ctx,
    stage: Stage,
    slot: &str,
    params: serde_json::Value,
    inputs: Vec<InputRef>,
    compute: impl FnOnce(&mut Staging) -> Result<serde_json::Value> + Send,
) -> Result<Summary> {
    let started = Instant::now();
    let backend = ctx.backend();
    let key = stage_key(stage.name(), stage.version(), &params, &inputs, &backend);
    if ctx.only_cached && ctx.store.lookup(&key)?.is_none() {
        return Err(NotCached(store::short(&key).to_string()).into());
    }
    let (artifact, outcome) = match ctx.store.claim(&key, stage.name())? {
        Claim::Done(artifact) => (artifact, Outcome::Hit),
        Claim::Mine(lock) => {
            let computing = Instant::now(); // the wall time excludes waiting for another process
            let mut staging = ctx.store.begin(&key)?;
            let metrics = crate::kernels::on_pool(|| compute(&mut staging))?;
            let mut manifest = Manifest::new(stage.name(), stage.version(), &key, params, inputs, ctx.config.seed);
            manifest.device = backend.device;
            manifest.dtype = backend.dtype;
            manifest.wall_time_s = computing.elapsed().as_secs_f64();
            manifest.metrics = metrics;
            let artifact = staging.publish(manifest)?;
            drop(lock);
            (artifact, Outcome::Miss)
        }
    };
    let ref_changed = ctx.store.publish_ref(&ctx.run, slot, &artifact)?;
    Ok(Summary {
        stage: stage.name().into(),
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

/// The policy an iteration samples with: the base policy for iteration 0, otherwise the policy
/// the previous iteration's update produced.
pub fn iteration_policy(ctx: &Ctx, iteration: u32) -> Result<Artifact> {
    if iteration == 0 {
        ctx.store.open_ref(&ctx.run, Stage::Bootstrap.name())
    } else {
        ctx.store.open_ref(&ctx.run, &Stage::GrpoUpdate.at(iteration - 1))
    }
}

/// The train-split prompts of an iteration: `n` prompts of a seeded shuffle of the split, read in
/// order from `cursor` (the data cursor of the policy's checkpoint), wrapping around.
pub fn iteration_prompts(train: &[PromptRow], seed: u64, cursor: usize, n: usize) -> Vec<PromptRow> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x6375_7273)); // "curs"
    (0..n).map(|j| train[order[(cursor + j) % order.len()]].clone()).collect()
}

/// Where the next iteration's prompts start: the data cursor of the policy's trainer state (0 for
/// the base policy).
pub fn data_cursor(policy: &Artifact) -> Result<usize> {
    Ok(checkpoint::load_trainer_state(policy)?.map_or(0, |s| s.data_cursor))
}

/// A policy as a stage input: its checkpoint files, and its trainer state when it has one (so a
/// moved data cursor or optimizer changes the keys downstream).
pub fn policy_input(name: &str, policy: &Artifact, with_state: bool) -> Result<InputRef> {
    let mut files: Vec<&str> = model::CHECKPOINT_FILES.to_vec();
    if with_state && policy.manifest.output(checkpoint::TRAINER_STATE_FILE).is_ok() {
        files.extend([checkpoint::TRAINER_STATE_FILE, checkpoint::OPTIMIZER_FILE]);
    }
    policy.manifest.as_input(name, &files)
}

/// Refuses rollouts that `policy` did not sample: a tokenizer that decodes them differently, or
/// other weights than the ones recorded with them.
pub fn check_sampled_by(policy: &Policy, rollouts: &[RolloutRow], iteration: u32) -> Result<()> {
    for (i, r) in rollouts.iter().enumerate() {
        let text = tokenizer::decode_pieces(&policy.tokenizer, &r.token_ids)
            .with_context(|| format!("{}: row {i}: the policy's tokenizer cannot decode the rollout", rollouts::FILE))?
            .concat();
        if text != r.text {
            bail!(
                "{}: row {i}: the policy of iteration {iteration} has a different tokenizer from the one that sampled the rollouts \
                 (its decoding differs from the stored text); rerun `sample` for this iteration",
                rollouts::FILE
            );
        }
        if r.policy_hash != policy.weights_hash {
            bail!(
                "{}: row {i}: sampled by policy {} but the policy of iteration {iteration} is {}; the rollouts are stale, rerun `sample`",
                rollouts::FILE,
                store::short(&r.policy_hash),
                store::short(&policy.weights_hash)
            );
        }
    }
    Ok(())
}

/// Checks that a table lists exactly the `expected` ids in order, naming the first missing or
/// extra one (`what` names the id, e.g. "episode (prompt, sample, episode)").
pub fn check_same_ids<K: PartialEq + std::fmt::Debug>(file: &str, what: &str, expected: &[K], got: &[K]) -> Result<()> {
    for (row, (e, g)) in expected.iter().zip(got).enumerate() {
        if e != g {
            if got.contains(e) {
                bail!("{file}: row {row}: extra {what} {g:?} (expected {e:?} here)");
            }
            bail!("{file}: row {row}: missing {what} {e:?} (found {g:?})");
        }
    }
    if got.len() > expected.len() {
        bail!("{file}: row {}: extra {what} {:?}", expected.len(), got[expected.len()]);
    }
    if got.len() < expected.len() {
        bail!("{file}: missing {what} {:?} (the table ends after {} rows)", expected[got.len()], got.len());
    }
    Ok(())
}

/// Episode ids of a rollout table in order, as (prompt_id, sample_idx).
pub fn rollout_ids(rollouts: &[RolloutRow]) -> Vec<(String, u32)> {
    rollouts.iter().map(|r| (r.prompt_id.clone(), r.sample_idx)).collect()
}

/// The episodes of each rollout, in rollout order, checked: every rollout has episodes
/// `0..K` whose spans partition its response, and no episode belongs to another rollout.
pub fn episodes_by_rollout<'a>(rollouts: &[RolloutRow], episodes: &'a [EpisodeRow]) -> Result<Vec<&'a [EpisodeRow]>> {
    let mut out = Vec::with_capacity(rollouts.len());
    let mut at = 0;
    for (i, r) in rollouts.iter().enumerate() {
        let start = at;
        while at < episodes.len() && episodes[at].prompt_id == r.prompt_id && episodes[at].sample_idx == r.sample_idx {
            at += 1;
        }
        let eps = &episodes[start..at];
        if eps.is_empty() {
            let found = episodes.get(start).map(|e| format!("{} sample {}", e.prompt_id, e.sample_idx));
            bail!(
                "{}: row {start}: missing the episodes of rollout {i} ({} sample {}){}",
                episodes::FILE,
                r.prompt_id,
                r.sample_idx,
                found.map_or(String::new(), |f| format!("; found an episode of {f}"))
            );
        }
        let mut end = 0;
        for (k, e) in eps.iter().enumerate() {
            if e.episode_idx as usize != k || e.token_start as usize != end || e.token_end < e.token_start || e.k as usize != eps.len() {
                bail!(
                    "{}: row {}: episode {k} of {} sample {} does not continue the partition of its response",
                    episodes::FILE,
                    start + k,
                    r.prompt_id,
                    r.sample_idx
                );
            }
            end = e.token_end as usize;
        }
        if end != r.token_ids.len() {
            bail!(
                "{}: the episodes of {} sample {} cover {end} of its {} tokens",
                episodes::FILE,
                r.prompt_id,
                r.sample_idx,
                r.token_ids.len()
            );
        }
        out.push(eps);
    }
    if at < episodes.len() {
        let e = &episodes[at];
        bail!(
            "{}: row {at}: extra episode {} of {} sample {}, which is not a rollout of this iteration",
            episodes::FILE,
            e.episode_idx,
            e.prompt_id,
            e.sample_idx
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::rollouts::FinishReason;

    pub(crate) fn rollout(prompt_id: &str, sample_idx: u32, n_tokens: usize) -> RolloutRow {
        RolloutRow {
            iteration: 0,
            prompt_id: prompt_id.into(),
            sample_idx,
            prompt_token_ids: vec![1, 2],
            token_ids: vec![7; n_tokens],
            text: String::new(),
            logprobs: vec![-1.0; n_tokens],
            finish_reason: FinishReason::Stop,
            seed: 0,
            temperature: 1.0,
            top_p: 1.0,
            policy_hash: "h".into(),
        }
    }

    fn episode(prompt_id: &str, sample_idx: u32, episode_idx: u32, span: (u32, u32), k: u32) -> EpisodeRow {
        EpisodeRow {
            iteration: 0,
            prompt_id: prompt_id.into(),
            sample_idx,
            episode_idx,
            token_start: span.0,
            token_end: span.1,
            text: String::new(),
            rule: "tags".into(),
            k,
            format_ok: true,
            well_formed: true,
            answer: None,
            grade: "wrong".into(),
            excluded: false,
            r_out: 0.0,
        }
    }

    #[test]
    fn episodes_must_partition_each_rollout_and_belong_to_one() {
        let rollouts = [rollout("a", 0, 5), rollout("a", 1, 3)];
        let good = vec![episode("a", 0, 0, (0, 2), 2), episode("a", 0, 1, (2, 5), 2), episode("a", 1, 0, (0, 3), 1)];
        let groups = episodes_by_rollout(&rollouts, &good).unwrap();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [2, 1]);
        // A missing rollout.
        let err = format!("{:#}", episodes_by_rollout(&rollouts, &good[..2]).unwrap_err());
        assert!(err.contains("missing the episodes of rollout 1"), "{err}");
        // An extra episode of a rollout that does not exist.
        let mut extra = good.clone();
        extra.push(episode("b", 0, 0, (0, 1), 1));
        let err = format!("{:#}", episodes_by_rollout(&rollouts, &extra).unwrap_err());
        assert!(err.contains("row 3: extra episode 0 of b sample 0"), "{err}");
        // A gap in the partition.
        let mut gap = good.clone();
        gap[1].token_start = 3;
        let err = format!("{:#}", episodes_by_rollout(&rollouts, &gap).unwrap_err());
        assert!(err.contains("row 1") && err.contains("partition"), "{err}");
    }

    #[test]
    fn id_lists_must_match_naming_the_first_missing_or_extra_id() {
        let want = [("a", 0), ("a", 1), ("b", 0)];
        assert!(check_same_ids("t.parquet", "rollout", &want, &want).is_ok());
        let err = format!("{:#}", check_same_ids("t.parquet", "rollout", &want, &[("a", 0), ("b", 0)]).unwrap_err());
        assert!(err.contains("t.parquet: row 1: extra rollout (\"b\", 0)") || err.contains("missing rollout (\"a\", 1)"), "{err}");
        let err = format!("{:#}", check_same_ids("t.parquet", "rollout", &want, &[("a", 0), ("a", 1)]).unwrap_err());
        assert!(err.contains("missing rollout (\"b\", 0)"), "{err}");
        let err = format!("{:#}", check_same_ids("t.parquet", "rollout", &want, &[("a", 0), ("a", 1), ("b", 0), ("c", 2)]).unwrap_err());
        assert!(err.contains("row 3: extra rollout (\"c\", 2)"), "{err}");
    }

    #[test]
    fn rollouts_from_another_tokenizer_or_policy_are_refused() {
        let dev = Device::Cpu;
        let corpus = |text: &str| vec![text.to_string(); 8];
        let tok_a = tokenizer::train(&corpus("<think><episode_1>12 + 3 = 15</episode_1></think>\n\\boxed{15}"), 300).unwrap();
        let tok_b = tokenizer::train(&corpus("zzzz yyyy xxxx wwww vvvv uuuu tttt"), 300).unwrap();
        let cfg = crate::model::test_config(16, 32, 1, 2, 1);
        let weights = model::init_weights(&cfg, 0, &dev).unwrap();
        let mut policy = Policy::from_parts(&cfg, &weights, tok_a.clone(), &dev).unwrap();
        policy.weights_hash = "h".into();
        let mut r = rollout("a", 0, 0);
        r.token_ids = tokenizer::encode(&tok_a, "12 + 3 = 15</episode_1>").unwrap();
        r.text = tokenizer::decode_pieces(&tok_a, &r.token_ids).unwrap().concat();
        assert!(check_sampled_by(&policy, std::slice::from_ref(&r), 0).is_ok());
        let other = Policy { tokenizer: tok_b, ..Policy::from_parts(&cfg, &weights, tok_a, &dev).unwrap() };
        let err = format!("{:#}", check_sampled_by(&other, std::slice::from_ref(&r), 0).unwrap_err());
        assert!(err.contains("different tokenizer"), "{err}");
        policy.weights_hash = "g".into();
        let err = format!("{:#}", check_sampled_by(&policy, &[r], 0).unwrap_err());
        assert!(err.contains("stale"), "{err}");
    }
}
