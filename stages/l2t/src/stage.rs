//! The pipeline's stages, defined once: each stage's name (also its binary's and its ref's),
//! its version (part of its key), the configuration it reads (the rest of its key), and the
//! order of an iteration. The store, the runners, `compare` and the bench read them from here;
//! the Makefile names the same binaries.

use crate::config::Config;
use std::fmt;

/// One stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Prepare,
    Bootstrap,
    Sample,
    Segment,
    FisherReward,
    CreditAssign,
    GrpoUpdate,
    Eval,
}

impl Stage {
    /// The stages that run once per run, in order.
    pub const RUN: [Stage; 2] = [Stage::Prepare, Stage::Bootstrap];

    /// The stages of one iteration, in order: a changed ref marks everything after it stale.
    pub const ITERATION: [Stage; 5] = [Stage::Sample, Stage::Segment, Stage::FisherReward, Stage::CreditAssign, Stage::GrpoUpdate];

    /// Its name: the binary, the ref's folder, the manifest's `stage`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Bootstrap => "bootstrap",
            Stage::Sample => "sample",
            Stage::Segment => "segment",
            Stage::FisherReward => "fisher-reward",
            Stage::CreditAssign => "credit-assign",
            Stage::GrpoUpdate => "grpo-update",
            Stage::Eval => "eval",
        }
    }

    /// Part of every key of the stage: raised whenever the stage's code would write other bytes
    /// for the same inputs and knobs, so that no earlier artifact is taken for a new one.
    pub fn version(self) -> u32 {
        match self {
            Stage::Prepare => 5,
            Stage::Bootstrap => 4,
            Stage::Sample => 2,
            Stage::Segment => 2,
            Stage::FisherReward => 9,
            Stage::CreditAssign => 2,
            Stage::GrpoUpdate => 4,
            Stage::Eval => 4,
        }
    }

    /// Whether the stage splits by prompt group (`--shard i/N`, then `--merge N`).
    pub fn shards_by_prompt_group(self) -> bool {
        matches!(self, Stage::Sample | Stage::FisherReward | Stage::Eval)
    }

    /// The ref slot of this stage in an iteration (`iter-0003/sample`).
    pub fn at(self, iteration: u32) -> String {
        format!("iter-{iteration:04}/{}", self.name())
    }

    /// The knobs that define the stage's output (hashed into its key and written to its
    /// manifest). Each stage sees only the sections it reads, so changing one knob reruns only
    /// the stages downstream of it.
    pub fn params(self, cfg: &Config) -> serde_json::Value {
        use serde_json::json;
        match self {
            Stage::Prepare => json!({ "seed": cfg.seed, "task": cfg.task }),
            Stage::Bootstrap => {
                json!({ "seed": cfg.seed, "model": cfg.model, "bootstrap": cfg.bootstrap, "prompt": cfg.prompt, "segment_rule": cfg.segment.rule })
            }
            Stage::Sample => json!({ "seed": cfg.seed, "rl_seed": cfg.rl_seed, "sample": cfg.sample, "prompt": cfg.prompt }),
            Stage::Segment => json!({ "segment": cfg.segment }),
            Stage::FisherReward => json!({ "reward": cfg.reward, "penalty": cfg.penalty }),
            Stage::CreditAssign => json!({ "credit": cfg.credit }),
            // The dr-grpo normaliser is the response token budget.
            Stage::GrpoUpdate => {
                json!({ "seed": cfg.seed, "rl_seed": cfg.rl_seed, "update": cfg.update, "max_new_tokens": cfg.sample.max_new_tokens })
            }
            // The forced-termination suffix is the reward's `close`.
            Stage::Eval => json!({ "seed": cfg.seed, "eval": cfg.eval, "close": cfg.reward.close, "prompt": cfg.prompt }),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_its_own_name_and_slot() {
        let names: std::collections::BTreeSet<&str> =
            Stage::RUN.into_iter().chain(Stage::ITERATION).chain([Stage::Eval]).map(Stage::name).collect();
        assert_eq!(names.len(), 8);
        assert_eq!(Stage::GrpoUpdate.at(3), "iter-0003/grpo-update");
    }

    #[test]
    fn a_stage_sees_only_the_sections_it_reads() {
        let base = Config::default();
        let changed = base.with_override("credit.beta", "0.1").unwrap();
        for stage in Stage::RUN.into_iter().chain(Stage::ITERATION).chain([Stage::Eval]) {
            let differs = stage.params(&base) != stage.params(&changed);
            assert_eq!(differs, stage == Stage::CreditAssign, "{stage}");
        }
    }
}
