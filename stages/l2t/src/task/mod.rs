//! Tasks: the built-in synthetic tasks (`arith`, the `decompose` testbed), the real benchmarks,
//! and the answer grader.

pub mod answer;
pub mod arith;
pub mod benchmarks;
pub mod decompose;
pub mod grade;

use crate::config::{TaskConfig, TaskKind};
use crate::table::prompts::PromptRow;
use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::hash::Hash;

/// Opening of the reasoning block.
pub const THINK_OPEN: &str = "<think>";
/// End of the reasoning block; the final answer follows it.
pub const THINK_CLOSE: &str = "</think>";
/// Opening of the final-answer box.
pub const BOXED_OPEN: &str = "\\boxed{";

/// `<episode_k>`.
pub fn episode_open(k: usize) -> String {
    format!("<episode_{k}>")
}

/// `</episode_k>`.
pub fn episode_close(k: usize) -> String {
    format!("</episode_{k}>")
}

/// The built-in task's splits: `eval` is the validation split (knobs are chosen on it), `test` is
/// kept for the pre-registered comparison alone (empty when `task.n_test = 0`).
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    pub train: Vec<PromptRow>,
    pub eval: Vec<PromptRow>,
    pub test: Vec<PromptRow>,
}

/// Generates the built-in task named by `task.kind`, seeded by the run's `seed`.
pub fn generate(cfg: &TaskConfig, seed: u64) -> Result<Splits> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7461_736b); // "task"
    match cfg.kind {
        TaskKind::Arith => {
            let (train, eval, test) = arith::generate(cfg, &mut rng)?;
            Ok(Splits { train, eval, test })
        }
        TaskKind::Decompose => {
            let [train, eval, test] = decompose::generate(cfg, &mut rng)?;
            Ok(Splits { train, eval, test })
        }
    }
}

/// Draws `n` rows of problems that no earlier row (of any split sharing `seen`) has: `draw` gets
/// the row's index and gives a problem (`None` when it found none), `row` writes a new problem's
/// row, which is named `<source>-<split>-<index>`.
pub(crate) fn distinct_rows<P: Clone + Eq + Hash>(
    source: &str,
    split: &str,
    n: usize,
    rng: &mut ChaCha8Rng,
    seen: &mut HashSet<P>,
    mut draw: impl FnMut(&mut ChaCha8Rng, usize) -> Option<P>,
    mut row: impl FnMut(&mut ChaCha8Rng, &P, usize) -> PromptRow,
) -> Result<Vec<PromptRow>> {
    let mut rows = Vec::with_capacity(n);
    let mut attempts = 0usize;
    while rows.len() < n {
        attempts += 1;
        if attempts > n * 50 + 1000 {
            bail!("task: only {} distinct {split} problems found; raise task.max_operand or task.steps", rows.len());
        }
        let Some(problem) = draw(rng, rows.len()) else { continue };
        if !seen.insert(problem.clone()) {
            continue;
        }
        let mut new_row = row(rng, &problem, rows.len());
        new_row.prompt_id = format!("{source}-{split}-{:06}", rows.len());
        rows.push(new_row);
    }
    Ok(rows)
}

/// What an episode does, where the built-in tasks can tell from its text (l2t-spec 5: `C~` is
/// reported separately for redundant and useful episodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EpisodeKind {
    /// Applies one of the problem's operations.
    Step,
    /// Decomposes a hard step (`decompose`: writes the node between a two-link move's ends): the
    /// episode the answer needs.
    UsefulSplit,
    /// The same kind of episode before an easy step: adds nothing.
    FillerSplit,
    /// Restates or inverts an earlier step: adds nothing.
    Check,
    /// Anything else (a benchmark's paragraphs, a malformed episode).
    Other,
}

impl EpisodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::UsefulSplit => "useful-split",
            Self::FillerSplit => "filler-split",
            Self::Check => "check",
            Self::Other => "other",
        }
    }

    /// Episodes that add nothing to the answer.
    pub fn is_filler(self) -> bool {
        matches!(self, Self::FillerSplit | Self::Check)
    }
}

/// The kind of an episode from its text (tags, `<think>` and a trailing answer allowed around it).
pub fn episode_kind(episode_text: &str) -> EpisodeKind {
    let inner = episode_text.trim_start();
    let inner = inner.strip_prefix(THINK_OPEN).unwrap_or(inner).trim_start();
    let inner = match inner.find('>') {
        Some(i) if inner.starts_with("<episode_") => inner[i + 1..].trim_start(),
        _ => inner,
    };
    if inner.starts_with(arith::CHECK_PREFIX) {
        return EpisodeKind::Check;
    }
    if let Some(split) = inner.strip_prefix(decompose::SPLIT_PREFIX) {
        // A path through two links (`k>Q>b`, `b<Q<k`) is useful; one link restated is filler.
        let path = split.split("</").next().unwrap_or_default();
        return if path.matches(['>', '<']).count() >= 2 { EpisodeKind::UsefulSplit } else { EpisodeKind::FillerSplit };
    }
    let mut chars = inner.chars();
    if chars.next().is_some_and(|c| c.is_ascii_digit()) && inner.contains(": ") {
        return EpisodeKind::Step;
    }
    EpisodeKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_kinds_by_text() {
        assert_eq!(episode_kind("<episode_3>Check: 68 * 3 = 204</episode_3>"), EpisodeKind::Check);
        assert_eq!(episode_kind("<think><episode_1>Check: 1 + 1 = 2"), EpisodeKind::Check);
        assert_eq!(episode_kind("<episode_2>2: * 3, 68 * 3 = 204</episode_2>"), EpisodeKind::Step);
        assert_eq!(episode_kind("<episode_1>Split: k>Q>b</episode_1>"), EpisodeKind::UsefulSplit);
        assert_eq!(episode_kind("<episode_4>Split: a>k</episode_4>"), EpisodeKind::FillerSplit);
        assert_eq!(episode_kind("<episode_1>Split: b<Q<k</episode_1>"), EpisodeKind::UsefulSplit);
        assert_eq!(episode_kind("<episode_2>Split: b<Q</episode_2><episode_3>"), EpisodeKind::FillerSplit);
        assert_eq!(episode_kind("<episode_2>2: go 2, k>b</episode_2>"), EpisodeKind::Step);
        assert_eq!(episode_kind("So the answer is 4.\n\n"), EpisodeKind::Other);
        assert!(EpisodeKind::Check.is_filler() && EpisodeKind::FillerSplit.is_filler() && !EpisodeKind::UsefulSplit.is_filler());
    }
}
