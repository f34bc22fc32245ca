//! Sharded stage runs, for the cluster runner: `--shard i/N` computes the prompt groups
//! `[i*G/N, (i+1)*G/N)` of a stage run as a store entry of its own, and `--merge N` joins the N
//! shards into the stage's usual artifact, under the usual key. The merged files are
//! byte-identical to an unsharded run's: every row draws from its own seeded generator, a row's
//! numbers do not depend on the rows batched with it, and the whole run and the merge write
//! through the same [`Sharded::finish`].

use super::{execute, Ctx, Summary};
use crate::stage::Stage;
use crate::store::{stage_key, Artifact, InputRef, Staging, SHARDS_DIR};
use anyhow::{bail, Context, Result};
use std::ops::Range;

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse::<u32>().ok()?, n.trim().parse::<u32>().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Self { index, count }),
            _ => bail!("--shard {s:?}: expected i/N with 0 <= i < N (e.g. 0/4)"),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// This shard's contiguous range of `groups` prompt groups (empty when there are fewer groups
    /// than shards).
    pub fn range(&self, groups: usize) -> Range<usize> {
        let (i, n) = (self.index as usize, self.count as usize);
        i * groups / n..(i + 1) * groups / n
    }
}

/// Which part of a stage run a process computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Part {
    #[default]
    Whole,
    Shard(Shard),
    /// Join this many shards, all computed before.
    Merge(u32),
}

impl Part {
    /// From the `--shard` and `--merge` flags (clap keeps them exclusive).
    pub fn from_flags(shard: Option<Shard>, merge: Option<u32>) -> Result<Self> {
        Ok(match (shard, merge) {
            (Some(s), None) => Part::Shard(s),
            (None, Some(0)) => bail!("--merge 0: there is nothing to merge"),
            (None, Some(n)) => Part::Merge(n),
            (None, None) => Part::Whole,
            (Some(_), Some(_)) => bail!("--shard and --merge exclude each other"),
        })
    }
}

/// The flags of a shardable stage binary.
#[derive(Debug, Clone, clap::Args)]
pub struct ShardArgs {
    /// Compute only shard i of N (contiguous ranges of prompt groups; a group never splits) as a
    /// store entry of its own, for `--merge N` to join.
    #[arg(long, value_name = "i/N", conflicts_with = "merge")]
    pub shard: Option<Shard>,
    /// Join the N shards computed before into the stage's usual artifact (byte-identical to an
    /// unsharded run's) and point the run's ref at it.
    #[arg(long, value_name = "N")]
    pub merge: Option<u32>,
}

impl ShardArgs {
    pub fn part(&self) -> Result<Part> {
        Part::from_flags(self.shard, self.merge)
    }
}

/// A stage whose work splits by prompt group.
pub trait Sharded {
    /// What a range of groups computes.
    type Piece;
    /// The number of prompt groups of the whole run.
    fn groups(&self) -> Result<usize>;
    fn compute(&self, groups: Range<usize>) -> Result<Self::Piece>;
    /// Writes a shard's piece into its store entry; returns the entry's metrics.
    fn write_piece(&self, piece: &Self::Piece, staging: &mut Staging) -> Result<serde_json::Value>;
    fn read_piece(&self, shard: &Artifact) -> Result<Self::Piece>;
    /// Writes the stage's outputs from the pieces of every group, in group order.
    fn finish(&self, pieces: Vec<Self::Piece>, staging: &mut Staging) -> Result<serde_json::Value>;
}

/// Where a shard's ref lives: `shards/<slot>/<i>of<N>` (refs keep a shard from gc until it is merged).
fn shard_slot(slot: &str, shard: Shard) -> String {
    format!("{SHARDS_DIR}{slot}/{}of{}", shard.index, shard.count)
}

fn shard_params(params: &serde_json::Value, shard: Shard) -> serde_json::Value {
    let mut params = params.clone();
    params["shard"] = shard.to_string().into();
    params
}

/// [`execute`] for a shardable stage: the whole run, one shard, or the merge of all shards, as
/// `ctx.part` says. `finish_inputs` are read only by [`Sharded::finish`]: the key of the whole
/// run and the merge covers them after `inputs`, a shard's key does not.
#[allow(clippy::too_many_arguments)]
pub fn execute_sharded<J: Sharded + Sync>(
    ctx: &Ctx,
    stage: Stage,
    slot: &str,
    params: serde_json::Value,
    mut inputs: Vec<InputRef>,
    finish_inputs: Vec<InputRef>,
    job: &J,
) -> Result<Summary> {
    let shard_inputs = inputs.clone();
    inputs.extend(finish_inputs);
    match ctx.part {
        Part::Whole => execute(ctx, stage, slot, params, inputs, |staging| {
            let piece = job.compute(0..job.groups()?)?;
            job.finish(vec![piece], staging)
        }),
        Part::Shard(shard) => {
            let params = shard_params(&params, shard);
            execute(ctx, stage, &shard_slot(slot, shard), params, shard_inputs, |staging| {
                let piece = job.compute(shard.range(job.groups()?))?;
                job.write_piece(&piece, staging)
            })
        }
        Part::Merge(count) => {
            let shards: Vec<Artifact> = (0..count)
                .map(|index| {
                    let shard = Shard { index, count };
                    let key = stage_key(stage.name(), stage.version(), &shard_params(&params, shard), &shard_inputs, &ctx.backend());
                    ctx.store.entry(&key)?.with_context(|| {
                        format!(
                            "shard {shard} of {slot} is not in the store (key {}): run `{stage} --shard {shard}` first",
                            crate::store::short(&key)
                        )
                    })
                })
                .collect::<Result<_>>()?;
            execute(ctx, stage, slot, params, inputs, |staging| {
                let pieces = shards.iter().map(|s| job.read_piece(s)).collect::<Result<Vec<_>>>()?;
                job.finish(pieces, staging)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_group_once_in_order() {
        for (groups, count) in [(16, 1), (16, 3), (5, 2), (2, 4), (0, 2)] {
            let ranges: Vec<Range<usize>> = (0..count).map(|index| Shard { index, count }.range(groups)).collect();
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, groups);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start), "{ranges:?}");
        }
        assert_eq!(Shard { index: 1, count: 3 }.range(16), 5..10);
    }

    #[test]
    fn shard_flags_parse_and_refuse_nonsense() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert_eq!(Part::from_flags(None, None).unwrap(), Part::Whole);
        assert_eq!(Part::from_flags(None, Some(3)).unwrap(), Part::Merge(3));
        assert!(Part::from_flags(None, Some(0)).is_err());
    }
}
