//! The rollouts table: one row per sampled response (l2t-spec section 1).

use super::{f32s, list_f32, list_field, list_u32, u32s, u64s, utf8, TableReader};
use crate::store::Staging;
use anyhow::{bail, Result};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

pub const FILE: &str = "rollouts.parquet";

pub const ITERATION: &str = "iteration";
pub const PROMPT_ID: &str = "prompt_id";
pub const SAMPLE_IDX: &str = "sample_idx";
pub const PROMPT_TOKEN_IDS: &str = "prompt_token_ids";
pub const TOKEN_IDS: &str = "token_ids";
pub const TEXT: &str = "text";
pub const LOGPROBS: &str = "logprobs";
pub const FINISH_REASON: &str = "finish_reason";
pub const N_TOKENS: &str = "n_tokens";
pub const SEED: &str = "seed";
pub const TEMPERATURE: &str = "temperature";
pub const TOP_P: &str = "top_p";
pub const POLICY_HASH: &str = "policy_hash";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new(ITERATION, DataType::UInt32, false),
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
        list_field(PROMPT_TOKEN_IDS, DataType::UInt32),
        list_field(TOKEN_IDS, DataType::UInt32),
        Field::new(TEXT, DataType::Utf8, false),
        list_field(LOGPROBS, DataType::Float32),
        Field::new(FINISH_REASON, DataType::Utf8, false),
        Field::new(N_TOKENS, DataType::UInt32, false),
        Field::new(SEED, DataType::UInt64, false),
        Field::new(TEMPERATURE, DataType::Float32, false),
        Field::new(TOP_P, DataType::Float32, false),
        Field::new(POLICY_HASH, DataType::Utf8, false),
    ])
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted its end-of-sequence token (kept as the response's last token).
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One rollout. `logprobs[t]` is log pi_old(token_ids[t] | prefix) under the sampling policy at
/// temperature 1 (the distribution the update's ratio is taken against).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub iteration: u32,
    pub prompt_id: String,
    pub sample_idx: u32,
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    pub seed: u64,
    pub temperature: f32,
    pub top_p: f32,
    pub policy_hash: String,
}

pub fn write(staging: &mut Staging, rows: &[RolloutRow]) -> Result<()> {
    let prompt_tokens: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_token_ids.clone()).collect();
    let tokens: Vec<Vec<u32>> = rows.iter().map(|r| r.token_ids.clone()).collect();
    let logprobs: Vec<Vec<f32>> = rows.iter().map(|r| r.logprobs.clone()).collect();
    let columns = vec![
        u32s(rows.iter().map(|r| r.iteration)),
        utf8(rows.iter().map(|r| &r.prompt_id)),
        u32s(rows.iter().map(|r| r.sample_idx)),
        list_u32(&prompt_tokens),
        list_u32(&tokens),
        utf8(rows.iter().map(|r| &r.text)),
        list_f32(&logprobs),
        utf8(rows.iter().map(|r| r.finish_reason.as_str())),
        u32s(rows.iter().map(|r| r.token_ids.len() as u32)),
        u64s(rows.iter().map(|r| r.seed)),
        f32s(rows.iter().map(|r| r.temperature)),
        f32s(rows.iter().map(|r| r.top_p)),
        utf8(rows.iter().map(|r| &r.policy_hash)),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

/// Reads and checks a rollouts table: every response non-empty, one log-prob per token, a known
/// finish reason, finite log-probs.
pub fn read(path: &Path) -> Result<Vec<RolloutRow>> {
    let t = TableReader::open(path)?;
    let (iterations, prompt_ids, sample_idx) = (t.u32(ITERATION)?, t.str(PROMPT_ID)?, t.u32(SAMPLE_IDX)?);
    let (prompt_tokens, tokens, texts) = (t.list_u32(PROMPT_TOKEN_IDS)?, t.list_u32(TOKEN_IDS)?, t.str(TEXT)?);
    let (logprobs, finish, n_tokens) = (t.list_f32(LOGPROBS)?, t.str(FINISH_REASON)?, t.u32(N_TOKENS)?);
    let (seeds, temps, top_ps, policies) = (t.u64(SEED)?, t.f32(TEMPERATURE)?, t.f32(TOP_P)?, t.str(POLICY_HASH)?);
    let mut rows = Vec::with_capacity(t.rows());
    for i in 0..t.rows() {
        let name = &t.name;
        if tokens[i].is_empty() {
            bail!("{name}: row {i}: empty response (no tokens) for prompt {}", prompt_ids[i]);
        }
        if logprobs[i].len() != tokens[i].len() || n_tokens[i] as usize != tokens[i].len() {
            bail!("{name}: row {i}: {} tokens but {} log-probs and n_tokens = {}", tokens[i].len(), logprobs[i].len(), n_tokens[i]);
        }
        let finish_reason = match finish[i].as_str() {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            other => bail!("{name}: column {FINISH_REASON}: row {i}: unknown finish reason {other:?}"),
        };
        rows.push(RolloutRow {
            iteration: iterations[i],
            prompt_id: prompt_ids[i].clone(),
            sample_idx: sample_idx[i],
            prompt_token_ids: prompt_tokens[i].clone(),
            token_ids: tokens[i].clone(),
            text: texts[i].clone(),
            logprobs: logprobs[i].clone(),
            finish_reason,
            seed: seeds[i],
            temperature: temps[i],
            top_p: top_ps[i],
            policy_hash: policies[i].clone(),
        });
    }
    Ok(rows)
}
