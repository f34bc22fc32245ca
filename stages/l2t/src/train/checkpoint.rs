//! What `grpo-update` writes beside the Hugging Face policy so that resuming is exact (l2t-spec
//! 8): the AdamW moments (`optimizer.safetensors`) and `trainer_state.json` (optimizer step =
//! schedule position, the data cursor, the update's RNG state).

use super::grpo::OptimizerState;
use crate::store::{Artifact, Caching, Staging};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// The position of a seeded ChaCha8 generator, to continue its stream exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    pub stream: u64,
    /// Words consumed (a u128, written as decimal text).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        let seed: String = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Self { seed, stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng> {
        if self.seed.len() != 64 {
            bail!("rng seed must be 64 hex digits, got {:?}", self.seed);
        }
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).with_context(|| format!("rng seed {:?}", self.seed))?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse::<u128>().with_context(|| format!("rng word_pos {:?}", self.word_pos))?);
        Ok(rng)
    }
}

/// Where a run stands after an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// The iteration whose update wrote this state.
    pub iteration: u32,
    /// AdamW steps taken so far in the run (the schedule's position).
    pub optimizer_step: usize,
    /// Steps the schedule plans for the whole run.
    pub planned_steps: usize,
    /// Position in the shuffled train split where the next iteration's prompts start.
    pub data_cursor: usize,
    /// The update's minibatch-shuffling generator, as the next update continues it.
    pub rng: RngState,
}

pub fn save_trainer_state(staging: &mut Staging, state: &TrainerState) -> Result<()> {
    staging.write_file(TRAINER_STATE_FILE, serde_json::to_string_pretty(state)?.as_bytes())
}

/// The trainer state of a policy artifact; `None` for a policy no update wrote (the base).
pub fn load_trainer_state(policy: &Artifact) -> Result<Option<TrainerState>> {
    if policy.manifest.output(TRAINER_STATE_FILE).is_err() {
        return Ok(None);
    }
    let path = policy.file(TRAINER_STATE_FILE)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", path.display()))?))
}

/// Writes the moments as `m.<tensor name>` / `v.<tensor name>`.
pub fn save_optimizer(staging: &mut Staging, names: &[String], state: &OptimizerState) -> Result<()> {
    let keys: Vec<(String, String)> = names.iter().map(|n| (format!("m.{n}"), format!("v.{n}"))).collect();
    let mut tensors: Vec<(&str, &Tensor)> = Vec::with_capacity(2 * names.len());
    for (i, (m, v)) in keys.iter().enumerate() {
        tensors.push((m, &state.m[i]));
        tensors.push((v, &state.v[i]));
    }
    // Read back once, by the next update: written around the page cache (store/direct.rs).
    crate::model::write_safetensors(staging, OPTIMIZER_FILE, &tensors, Caching::Uncached).context("writing the optimizer state")
}

/// The optimizer state of a policy artifact, in `names` order; `None` for the base policy.
pub fn load_optimizer(policy: &Artifact, names: &[String], dev: &Device) -> Result<Option<OptimizerState>> {
    let Some(trainer) = load_trainer_state(policy)? else { return Ok(None) };
    let mut loaded: std::collections::HashMap<String, Tensor> =
        crate::model::read_uncached_safetensors_as_f32(policy, OPTIMIZER_FILE, dev)?.into_iter().collect();
    let mut take =
        |key: String| loaded.remove(&key).with_context(|| format!("{}: no tensor {key}", policy.dir.join(OPTIMIZER_FILE).display()));
    let (mut m, mut v) = (Vec::with_capacity(names.len()), Vec::with_capacity(names.len()));
    for name in names {
        m.push(take(format!("m.{name}"))?);
        v.push(take(format!("v.{name}"))?);
    }
    Ok(Some(OptimizerState { m, v, step: trainer.optimizer_step }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn rng_state_resumes_the_stream() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let _: [u64; 5] = rng.random();
        let saved = RngState::capture(&rng);
        let expected: Vec<u64> = (0..4).map(|_| rng.random()).collect();
        let json = serde_json::to_string(&saved).unwrap();
        let mut restored = serde_json::from_str::<RngState>(&json).unwrap().restore().unwrap();
        let got: Vec<u64> = (0..4).map(|_| restored.random()).collect();
        assert_eq!(got, expected);
    }
}
