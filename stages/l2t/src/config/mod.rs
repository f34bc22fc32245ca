//! `pipeline.toml`: every knob of a run, with its default in one place.
//!
//! Knob names follow `l2t-spec.md`. Unknown keys are refused (a typo must not silently fall back to a
//! default), and every value a stage uses lands in its manifest through [`crate::stage::Stage::params`].

mod knobs;

pub use knobs::{
    AnswerExtraction, DeviceSpec, Estimator, JMode, LossAgg, Method, Precision, PromptStyle, Rule, Scale, Source, TaskKind, Template,
    TokenScale,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Most nodes of the `decompose` map (one letter each; `task::decompose::NODES` holds them).
pub const MAX_LINKS: usize = 52;

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    /// Root of every random draw in the run.
    pub seed: u64,
    /// Seed of the iterations' own draws (sampling, minibatch order) on top of `seed`; the data
    /// and the base policy depend on `seed` alone, so runs that differ only here share them.
    pub rl_seed: u64,
    /// Compute threads (0 = all cores).
    pub threads: usize,
    /// Where the policy's passes run: `cpu` or `cuda:N` (part of every key but on the CPU).
    pub device: DeviceSpec,
    /// Precision of sampling and scoring (`f32` or `bf16`); training is f32. Part of every key
    /// but f32's.
    pub dtype: Precision,
    pub task: TaskConfig,
    pub prompt: PromptConfig,
    pub model: ModelShape,
    pub bootstrap: BootstrapConfig,
    pub sample: SampleConfig,
    pub segment: SegmentConfig,
    pub reward: RewardConfig,
    pub penalty: PenaltyConfig,
    pub credit: CreditConfig,
    pub update: UpdateConfig,
    pub eval: EvalConfig,
    pub slurm: SlurmConfig,
}

/// Evaluation (l2t-spec section 9), stage `eval`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Samples per prompt.
    pub k: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// The token budget of a response.
    pub max_new_tokens: usize,
    /// Budgets at which accuracy is also read (truncate, force `reward.close`, read the answer).
    pub budgets: Vec<usize>,
    /// Tokens greedily decoded after the forced `close` to read the answer.
    pub answer_tokens: usize,
    /// Prompts of the split evaluated (0 = all).
    pub prompts: usize,
    pub batch_rows: usize,
    /// How the answer is read from a response: `stated` (the last `\boxed{}`, else the last
    /// stated answer, as math-verify reads free text) or `boxed` (a box or nothing, as the RL
    /// reward reads it).
    pub answer: AnswerExtraction,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            k: 8,
            temperature: 0.6,
            top_p: 0.95,
            max_new_tokens: 160,
            budgets: vec![16, 32, 48, 64],
            answer_tokens: 12,
            prompts: 0,
            batch_rows: 64,
            answer: AnswerExtraction::Stated,
        }
    }
}

/// The cluster runner (`make iterate RUNNER=slurm`): how its jobs are submitted. Part of no stage
/// key (where a stage ran does not change its bytes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// `--partition` ("" = the cluster's default).
    pub partition: String,
    /// `--time` per job, e.g. "02:00:00" ("" = the partition's default).
    pub time: String,
    /// `--cpus-per-task` (0 = the cluster's default); the stages use this many threads.
    pub cpus_per_task: usize,
    /// `--gpus-per-task` (0 = none).
    pub gpus_per_task: usize,
    /// `--mem` per job, e.g. "16G" ("" = the cluster's default).
    pub mem: String,
    /// Further `sbatch` options, one per item, e.g. ["--account=rl", "--qos=high"].
    pub extra: Vec<String>,
    /// Shards of `sample` and `fisher-reward` (job arrays); `make iterate SHARDS=N` overrides it.
    pub shards: u32,
    /// Seconds between two looks at the queue while waiting.
    pub poll_s: f64,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            partition: String::new(),
            time: String::new(),
            cpus_per_task: 0,
            gpus_per_task: 0,
            mem: String::new(),
            extra: Vec::new(),
            shards: 1,
            poll_s: 2.0,
        }
    }
}

/// The built-in synthetic task (the `tiny` profile's data).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// `arith` (small-number arithmetic with redundant checks) or `decompose` (the testbed: walks
    /// over a table of links whose two-link moves need a decomposition episode, with filler
    /// splits and checks; see `task/decompose.rs`).
    pub kind: TaskKind,
    /// Operations per problem: the main difficulty knob.
    pub steps: usize,
    /// Largest starting value and largest added/subtracted operand.
    pub max_operand: u32,
    /// Largest multiplier (multiplications use 2..=max_multiplier).
    pub max_multiplier: u32,
    /// Every intermediate value stays in [0, max_value].
    pub max_value: u32,
    pub n_train: usize,
    /// The validation split (knobs are chosen on it; `make eval`'s default).
    pub n_eval: usize,
    /// The test split, kept for the pre-registered comparison alone (0 = none).
    pub n_test: usize,
    /// Share of worked solutions that carry redundant "Check:" episodes.
    pub redundant_share: f64,
    /// Most redundant episodes in one worked solution (at least 1 when present).
    pub max_redundant: usize,
    /// `decompose`: nodes of the map (one letter each, at most 52).
    pub links: usize,
    /// `decompose`: most hard moves in a problem; tiers 0..=max_hard have equal shares.
    pub max_hard: usize,
    /// `decompose`: probability of a "Split:" episode before each move of a worked solution,
    /// whatever the move (useful before a hard move, filler before an easy one).
    pub split_share: f64,
    /// `decompose`: probability that a hard move written without its split is wrong.
    pub direct_error: f64,
    /// `completion`: the prompt text carries the format line and ends where the solution starts
    /// (the tiny policy, raw prompts); `question`: the bare question, for chat models whose
    /// template and `prompt.instructions` carry the format.
    pub prompt_style: PromptStyle,
    /// A prompts file (Parquet, written by `make data`, e.g. GSM8K test) that replaces the
    /// generated eval split; "" keeps the generated one.
    #[serde(with = "knobs::optional_path")]
    pub eval_file: Option<std::path::PathBuf>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            kind: TaskKind::Arith,
            steps: 2,
            max_operand: 9,
            max_multiplier: 3,
            max_value: 20,
            n_train: 1_800,
            n_eval: 256,
            n_test: 0,
            redundant_share: 0.9,
            max_redundant: 2,
            links: 52,
            max_hard: 2,
            split_share: 0.5,
            direct_error: 0.7,
            prompt_style: PromptStyle::Completion,
            eval_file: None,
        }
    }
}

/// How a prompt row becomes the policy's input tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// `raw`: the prompt text as is; `chat`: the checkpoint's own chat template over a system
    /// message (when `system` is set) and a user message (the prompt, then `instructions`).
    pub template: Template,
    pub system: String,
    /// Appended to the prompt in the user message: the episode format the reward relies on.
    pub instructions: String,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self { template: Template::Raw, system: String::new(), instructions: String::new() }
    }
}

/// Shape of the tiny Qwen2-family policy that `bootstrap` trains (config.json keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelShape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
}

impl Default for ModelShape {
    fn default() -> Self {
        Self {
            vocab_size: 512,
            hidden_size: 128,
            intermediate_size: 512,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
        }
    }
}

/// Supervised warm-up of the base policy on the task's worked solutions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapConfig {
    /// `tiny`: train the tiny policy on the task; otherwise the path of a checkpoint to start
    /// from (a `.gguf` file or a Hugging Face directory), imported as the base policy.
    pub source: Source,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_frac: f64,
    pub weight_decay: f64,
    /// Eval-split prompts sampled once at the end to report format / accuracy / redundancy.
    pub eval_prompts: usize,
    pub eval_temperature: f64,
    pub eval_max_new_tokens: usize,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            source: Source::Tiny,
            steps: 1_200,
            batch_size: 16,
            lr: 3e-3,
            warmup_frac: 0.05,
            weight_decay: 0.01,
            eval_prompts: 256,
            eval_temperature: 0.6,
            eval_max_new_tokens: 160,
        }
    }
}

/// Rollout sampling (l2t-spec section 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    pub prompts_per_iter: usize,
    /// G, rollouts per prompt.
    pub group_size: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Rows decoded together (prompts x samples are split into batches of this many rows).
    pub batch_rows: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { prompts_per_iter: 16, group_size: 8, temperature: 1.0, top_p: 1.0, max_new_tokens: 160, batch_rows: 64 }
    }
}

/// Episode segmentation and outcome reward (l2t-spec sections 2-3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    pub rule: Rule,
    /// Added to the outcome reward of a response with no parseable episode.
    pub format_penalty: f64,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self { rule: Rule::Tags, format_penalty: -0.01 }
    }
}

/// Fitting information gain (l2t-spec section 4), stage `fisher-reward`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Forced-termination suffix teacher-forced before the gold answer.
    pub close: String,
    pub j_mode: JMode,
    /// Rollouts scored together (memory: their caches are copied once per episode boundary).
    pub batch_rows: usize,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self { close: "</think>\n\\boxed{".into(), j_mode: JMode::Prob, batch_rows: 16 }
    }
}

/// Compression penalty (l2t-spec section 5), stage `fisher-reward`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PenaltyConfig {
    /// Decoder layer whose MLP block is the proxy (negative counts from the end: -1 = last).
    pub block: i64,
    /// Share of each matrix's smaller dimension kept by the SVD projection of `D`.
    pub rank_fraction: f64,
    pub damping: f64,
    pub estimator: Estimator,
    /// Step of the finite difference along `D~`.
    pub eps: f64,
    pub scale: Scale,
    /// `gain-matched`: the quantile of the batch's nonzero `C` at which each `C` is capped.
    pub cap_quantile: f64,
}

impl Default for PenaltyConfig {
    fn default() -> Self {
        Self {
            block: -1,
            rank_fraction: 0.05,
            damping: 1e-5,
            estimator: Estimator::Jvp,
            eps: 1e-3,
            scale: Scale::GainMatched,
            cap_quantile: 0.9,
        }
    }
}

/// Episode reward and credit assignment (l2t-spec sections 6-7), stage `credit-assign`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CreditConfig {
    pub method: Method,
    pub alpha: f64,
    pub beta: f64,
    /// Share of token rewards dropped from the rollout mean, half from each tail.
    pub trim: f64,
    /// `c`: bound on a token's relative contribution `x_t` (or `|r_t / rbar|`).
    pub clip: f64,
    pub token_scale: TokenScale,
    /// `rho` of `regularised`: the guard near a zero rollout mean.
    pub rho: f64,
    /// `a_lp` of the `length-penalty` baseline.
    pub a_lp: f64,
}

impl Default for CreditConfig {
    fn default() -> Self {
        Self {
            method: Method::L2t,
            alpha: 0.8,
            beta: 0.6,
            trim: 0.05,
            clip: 10.0,
            token_scale: TokenScale::Regularised,
            rho: 0.25,
            a_lp: 0.2,
        }
    }
}

/// Policy update (l2t-spec section 8), stage `grpo-update`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    pub lr: f64,
    /// Share of the run's planned optimizer steps spent warming up.
    pub warmup_frac: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub eps_low: f64,
    pub eps_high: f64,
    /// Weight of the k3 KL to the base policy (0 skips the reference pass).
    pub beta_kl: f64,
    pub loss_agg: LossAgg,
    pub ppo_epochs: usize,
    /// Optimizer steps per epoch (the iteration's rollouts split evenly).
    pub minibatches: usize,
    /// Sequences per forward/backward pass (gradients accumulate across them).
    pub micro_batch: usize,
    /// Iterations the run plans: the length of the cosine schedule.
    pub planned_iterations: usize,
    /// The cosine schedule decays to this share of `lr` (0 = to zero).
    pub min_lr_ratio: f64,
    /// Score the batch again after the update, to record `batch_loss_after` in the manifest (one
    /// more pass over the batch, for auditing; the update itself is the same either way).
    pub loss_after: bool,
    /// Score the batch before the update even when the sampler ran in f32, to record the
    /// sampler/trainer log-prob mismatch (after bf16 sampling the update always does: its
    /// `logp_old` are then its own f32 log-probs).
    pub audit_logp_old: bool,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            warmup_frac: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            eps_low: 0.2,
            eps_high: 0.2,
            beta_kl: 0.001,
            loss_agg: LossAgg::TokenMean,
            ppo_epochs: 1,
            minibatches: 2,
            micro_batch: 16,
            planned_iterations: 20,
            min_lr_ratio: 0.0,
            loss_after: false,
            audit_logp_old: false,
        }
    }
}

impl Config {
    /// The root of the iterations' draws: `seed` itself when `rl_seed = 0`.
    pub fn iteration_seed(&self) -> u64 {
        if self.rl_seed == 0 {
            return self.seed;
        }
        seed_of(&format!("{}/{}", self.seed, self.rl_seed))
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the configuration", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}: invalid configuration", path.display()))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        config.validate()?;
        Ok(config)
    }

    /// This configuration with one knob set, named by its dotted path (`credit.beta`); the value is
    /// TOML (`0`, `"rollout"`, `[32, 64]`), or a bare word taken as a string. The result is
    /// validated like a file.
    pub fn with_override(&self, key: &str, value: &str) -> Result<Self> {
        let mut root = toml::Value::try_from(self).context("the configuration as TOML")?;
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .map(|mut t| t.remove("v").expect("the table has v"))
            .unwrap_or_else(|_| toml::Value::String(value.to_string()));
        let mut at = &mut root;
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            at = at.get_mut(*part).filter(|v| v.is_table()).with_context(|| format!("{key}: no section {part:?}"))?;
        }
        let leaf = parts[parts.len() - 1];
        let table = at.as_table_mut().with_context(|| format!("{key}: not a knob"))?;
        if !table.contains_key(leaf) {
            bail!("{key}: unknown knob");
        }
        table.insert(leaf.to_string(), parsed);
        let config: Config =
            root.try_into().map_err(|e: toml::de::Error| anyhow::anyhow!("{key} = {value}: {}", e.to_string().trim_end()))?;
        config.validate().with_context(|| format!("{key} = {value}"))?;
        Ok(config)
    }

    /// Refuses values no stage can run with, naming the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.task;
        let m = &self.model;
        let b = &self.bootstrap;
        let s = &self.sample;
        let (p, c, u) = (&self.penalty, &self.credit, &self.update);
        let checks = [
            (t.steps >= 1, "task.steps must be at least 1"),
            (t.max_operand >= 2, "task.max_operand must be at least 2"),
            (t.max_multiplier >= 2, "task.max_multiplier must be at least 2"),
            (t.max_value >= t.max_operand, "task.max_value must be at least task.max_operand"),
            (t.n_train >= 1 && t.n_eval >= 1, "task.n_train and task.n_eval must be at least 1"),
            ((0.0..=1.0).contains(&t.redundant_share), "task.redundant_share must lie in [0, 1]"),
            (
                (0.0..=1.0).contains(&t.split_share) && (0.0..=1.0).contains(&t.direct_error),
                "task.split_share and task.direct_error must lie in [0, 1]",
            ),
            (
                t.kind != TaskKind::Decompose || (t.max_hard <= t.steps && (3..=MAX_LINKS).contains(&t.links)),
                "task.kind = decompose needs task.max_hard <= task.steps and task.links in 3..=52",
            ),
            (
                m.hidden_size.is_multiple_of(m.num_attention_heads.max(1)),
                "model.hidden_size must be a multiple of model.num_attention_heads",
            ),
            (
                m.num_key_value_heads >= 1 && m.num_attention_heads.is_multiple_of(m.num_key_value_heads.max(1)),
                "model.num_attention_heads must be a multiple of model.num_key_value_heads",
            ),
            ((m.hidden_size / m.num_attention_heads.max(1)).is_multiple_of(2), "model head dimension must be even (rotary embedding)"),
            (m.vocab_size >= 300, "model.vocab_size must be at least 300 (256 bytes + special and tag tokens)"),
            (
                m.num_hidden_layers >= 1 && m.intermediate_size >= 1,
                "model.num_hidden_layers and model.intermediate_size must be at least 1",
            ),
            (b.steps >= 1 && b.batch_size >= 1, "bootstrap.steps and bootstrap.batch_size must be at least 1"),
            (b.lr > 0.0 && b.lr.is_finite(), "bootstrap.lr must be positive"),
            (b.eval_temperature >= 0.0, "bootstrap.eval_temperature must be >= 0"),
            (s.prompts_per_iter >= 1 && s.group_size >= 1, "sample.prompts_per_iter and sample.group_size must be at least 1"),
            (s.temperature >= 0.0 && s.temperature.is_finite(), "sample.temperature must be >= 0"),
            (s.top_p > 0.0 && s.top_p <= 1.0, "sample.top_p must lie in (0, 1]"),
            (
                s.max_new_tokens >= 1 && s.batch_rows >= 1 && b.eval_max_new_tokens >= 1,
                "sample.max_new_tokens, sample.batch_rows and bootstrap.eval_max_new_tokens must be at least 1",
            ),
            (!self.reward.close.is_empty(), "reward.close must not be empty"),
            (self.reward.batch_rows >= 1, "reward.batch_rows must be at least 1"),
            (p.rank_fraction > 0.0 && p.rank_fraction <= 1.0, "penalty.rank_fraction must lie in (0, 1]"),
            (p.damping >= 0.0 && p.damping.is_finite(), "penalty.damping must be >= 0"),
            (p.eps > 0.0 && p.eps.is_finite(), "penalty.eps must be positive"),
            (p.cap_quantile > 0.0 && p.cap_quantile <= 1.0, "penalty.cap_quantile must lie in (0, 1]"),
            (c.rho > 0.0 && c.rho.is_finite(), "credit.rho must be positive"),
            (c.alpha.is_finite() && c.beta.is_finite(), "credit.alpha and credit.beta must be finite numbers"),
            ((0.0..1.0).contains(&c.trim), "credit.trim must lie in [0, 1)"),
            (c.clip > 0.0, "credit.clip must be positive"),
            ((0.0..=1.0).contains(&c.a_lp), "credit.a_lp must lie in [0, 1]"),
            (u.lr > 0.0 && u.lr.is_finite(), "update.lr must be positive"),
            ((0.0..=1.0).contains(&u.warmup_frac), "update.warmup_frac must lie in [0, 1]"),
            ((0.0..=1.0).contains(&u.min_lr_ratio), "update.min_lr_ratio must lie in [0, 1]"),
            (u.weight_decay >= 0.0 && u.max_grad_norm > 0.0, "update.weight_decay must be >= 0 and update.max_grad_norm positive"),
            ((0.0..1.0).contains(&u.eps_low) && u.eps_high >= 0.0, "update.eps_low must lie in [0, 1) and update.eps_high be >= 0"),
            (u.beta_kl >= 0.0 && u.beta_kl.is_finite(), "update.beta_kl must be >= 0"),
            (
                u.ppo_epochs >= 1 && u.minibatches >= 1 && u.micro_batch >= 1 && u.planned_iterations >= 1,
                "update.ppo_epochs, update.minibatches, update.micro_batch and update.planned_iterations must be at least 1",
            ),
            (
                self.eval.k >= 1 && self.eval.max_new_tokens >= 1 && self.eval.batch_rows >= 1 && self.eval.answer_tokens >= 1,
                "eval.k, eval.max_new_tokens, eval.answer_tokens and eval.batch_rows must be at least 1",
            ),
            (
                self.eval.temperature >= 0.0 && self.eval.top_p > 0.0 && self.eval.top_p <= 1.0,
                "eval.temperature must be >= 0 and eval.top_p lie in (0, 1]",
            ),
            (self.eval.budgets.iter().all(|&b| b >= 1), "eval.budgets must be positive token counts"),
        ];
        for (ok, message) in checks {
            if !ok {
                bail!("{message}");
            }
        }
        Ok(())
    }
}

/// A 64-bit seed derived from a text (the first 8 bytes of its blake3 hash).
pub fn seed_of(text: &str) -> u64 {
    let h = blake3::hash(text.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("a blake3 hash has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_shipped_pipeline_toml_holds_the_defaults() {
        assert_eq!(Config::parse(include_str!("../../../../pipeline.toml")).unwrap(), Config::default());
    }

    #[test]
    fn the_profiles_change_only_what_they_say() {
        for text in [include_str!("../../../../profiles/decompose.toml"), include_str!("../../../../profiles/smollm2.toml")] {
            Config::parse(text).unwrap();
        }
        let mut want = Config::default();
        (want.update.planned_iterations, want.eval.k, want.eval.prompts) = (10, 4, 128);
        want.penalty.estimator = Estimator::Fd;
        assert_eq!(Config::parse(include_str!("../../../../profiles/compare-arith.toml")).unwrap(), want);
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = Config::parse("[sample]\ngroup_sise = 4\n").unwrap_err();
        assert!(format!("{err:#}").contains("group_sise"), "{err:#}");
    }

    #[test]
    fn a_knob_is_overridden_by_its_dotted_path() {
        let c = Config::default().with_override("credit.beta", "0").unwrap();
        assert_eq!(c.credit.beta, 0.0);
        let c = c.with_override("credit.token_scale", "rollout").unwrap().with_override("eval.budgets", "[8, 16]").unwrap();
        assert_eq!((c.credit.token_scale, c.eval.budgets.clone()), (TokenScale::Rollout, vec![8, 16]));
        assert_eq!(Config::default().with_override("rl_seed", "4").unwrap().rl_seed, 4);
        for (key, value, want) in [
            ("credit.betta", "0", "unknown knob"),
            ("credits.beta", "0", "no section"),
            ("credit.token_scale", "up", "token_scale"),
            ("sample.top_p", "2", "sample.top_p"),
        ] {
            let err = format!("{:#}", Config::default().with_override(key, value).unwrap_err());
            assert!(err.contains(want), "{key}: {err}");
        }
    }

    #[test]
    fn malformed_toml_is_refused() {
        assert!(Config::parse("[sample\n").is_err());
    }

    #[test]
    fn bad_value_is_refused_with_its_key() {
        let err = Config::parse("[sample]\ntop_p = 0.0\n").unwrap_err();
        assert!(format!("{err:#}").contains("sample.top_p"), "{err:#}");
        let err = Config::parse("[segment]\nrule = \"lines\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("segment.rule"), "{err:#}");
    }
}
