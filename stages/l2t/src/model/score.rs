//! Per-token log-probabilities of a text under a checkpoint (the `l2t score` command): for
//! debugging prompts and comparing numerics with other frameworks.

use super::{qwen2::causal_mask, Policy};
use anyhow::{anyhow, bail, Result};
use candle_core::{Tensor, D};
use serde::Serialize;

/// One alternative at a position.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alternative {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
}

/// A token of the text with its log-probability given the tokens before it (the first token has
/// none: nothing predicts it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenScore {
    pub id: u32,
    pub token: String,
    pub logprob: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<Alternative>,
}

/// Scores `ids` in one teacher-forced pass; `top_k` alternatives per scored position.
pub fn score_ids(policy: &Policy, ids: &[u32], top_k: usize) -> Result<Vec<TokenScore>> {
    if ids.is_empty() {
        bail!("nothing to score: the text has no tokens");
    }
    if ids.len() > policy.cfg.max_position_embeddings {
        bail!("{} tokens exceed the model's context of {}", ids.len(), policy.cfg.max_position_embeddings);
    }
    let t = ids.len();
    let logp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits(policy, ids)?, D::Minus1)?.to_vec2()?;
    let piece = |id: u32| -> Result<String> { policy.tokenizer.decode(&[id], false).map_err(|e| anyhow!("decoding token {id}: {e}")) };
    let mut out = Vec::with_capacity(t);
    for (j, &id) in ids.iter().enumerate() {
        let (logprob, top) = if j == 0 {
            (None, Vec::new())
        } else {
            let row = &logp[j - 1];
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = order
                .into_iter()
                .take(top_k)
                .map(|i| Ok(Alternative { id: i as u32, token: piece(i as u32)?, logprob: row[i] }))
                .collect::<Result<_>>()?;
            (Some(row[id as usize]), top)
        };
        out.push(TokenScore { id, token: piece(id)?, logprob, top });
    }
    Ok(out)
}

/// The logits (t, vocab) of a token sequence from position 0.
pub fn logits(policy: &Policy, ids: &[u32]) -> Result<Tensor> {
    let dev = &policy.device;
    let t = ids.len();
    let tokens = Tensor::from_vec(ids.to_vec(), (1, t), dev)?;
    let positions = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?;
    Ok(policy.model.forward(&tokens, &positions, &causal_mask(1, t, dev)?, None)?.squeeze(0)?)
}
