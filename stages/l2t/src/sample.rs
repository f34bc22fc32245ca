//! Batched sampling with a KV cache (l2t-spec section 1).
//!
//! Prompts of different lengths share a batch through left padding with per-row positions. Every
//! row draws from its own generator, seeded per (run seed, iteration, prompt, sample), so a
//! rollout does not depend on which rows it was batched with.

use crate::model::qwen2::padded_mask;
use crate::model::{KvCache, Policy};
use crate::table::rollouts::FinishReason;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to draw tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Keep generating past the end-of-sequence token (fixed-length benchmarks).
    pub ignore_eos: bool,
}

/// One row to generate.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub seed: u64,
}

/// One generated response.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Response tokens, ending with the end-of-sequence token when `finish` is `Stop`.
    pub tokens: Vec<u32>,
    /// log pi(token | prefix) at temperature 1, one per token.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// log-softmax of one row of logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

/// Draws a token from `logits` with temperature and nucleus (top-p) truncation, using one uniform
/// draw `u` in [0, 1). Ties in probability are ordered by token id, so the draw is deterministic.
pub fn draw_token(logits: &[f32], temperature: f64, top_p: f64, u: f64) -> u32 {
    if temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top_p < 1.0 {
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let mut kept = 0.0;
        let mut n = 0;
        while n < order.len() && kept < top_p * total {
            kept += weights[order[n]];
            n += 1;
        }
        order.truncate(n.max(1));
    }
    let mass: f64 = order.iter().map(|&i| weights[i]).sum();
    let target = u * mass;
    let mut acc = 0.0;
    for &i in &order {
        acc += weights[i];
        if acc > target {
            return i as u32;
        }
    }
    *order.last().expect("at least one candidate token") as u32
}

/// Generates a response for every request, `batch_rows` rows at a time, in request order.
pub fn generate(
    policy: &Policy,
    requests: &[Request],
    params: &SamplerParams,
    batch_rows: usize,
    mut on_batch_done: impl FnMut(usize),
) -> Result<Vec<Generation>> {
    let context = policy.cfg.max_position_embeddings;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt_ids.is_empty() {
            bail!("request {i}: empty prompt");
        }
        if r.prompt_ids.len() + params.max_new_tokens > context {
            bail!(
                "request {i}: prompt of {} tokens + max_new_tokens {} exceeds the model's context of {context} tokens",
                r.prompt_ids.len(),
                params.max_new_tokens
            );
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(batch_rows.max(1)) {
        out.extend(generate_batch(policy, chunk, params).context("sampling a batch")?);
        on_batch_done(chunk.len());
    }
    Ok(out)
}

fn generate_batch(policy: &Policy, rows: &[Request], params: &SamplerParams) -> Result<Vec<Generation>> {
    let dev = &policy.device;
    let b = rows.len();
    let prompt_len = rows.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    let pad: Vec<usize> = rows.iter().map(|r| prompt_len - r.prompt_ids.len()).collect();
    let mut tokens = Vec::with_capacity(b * prompt_len);
    let mut positions = Vec::with_capacity(b * prompt_len);
    for (r, row) in rows.iter().enumerate() {
        tokens.extend(std::iter::repeat(policy.pad_id).take(pad[r]).chain(row.prompt_ids.iter().copied()));
        positions.extend((0..prompt_len).map(|j| j.saturating_sub(pad[r]) as u32));
    }
    let mut cache = KvCache::new(policy.cfg.num_hidden_layers);
    let mut logits = policy.model.forward(
        &Tensor::from_vec(tokens, (b, prompt_len), dev)?,
        &Tensor::from_vec(positions, (b, prompt_len), dev)?,
        &padded_mask(&pad, 0, prompt_len, dev)?,
        Some(&mut cache),
    )?;
    let mut rngs: Vec<ChaCha8Rng> = rows.iter().map(|r| ChaCha8Rng::seed_from_u64(r.seed)).collect();
    let mut gens: Vec<Generation> =
        (0..b).map(|_| Generation { tokens: Vec::new(), logprobs: Vec::new(), finish: FinishReason::Length }).collect();
    let mut done = vec![false; b];
    for step in 0..params.max_new_tokens {
        let last = logits.narrow(1, logits.dim(1)? - 1, 1)?.squeeze(1)?;
        let last: Vec<Vec<f32>> = last.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            if done[r] {
                next.push(policy.pad_id);
                continue;
            }
            let u: f64 = rngs[r].random();
            let token = draw_token(&last[r], params.temperature, params.top_p, u);
            let logp = log_softmax(&last[r])[token as usize];
            gens[r].tokens.push(token);
            gens[r].logprobs.push(logp);
            if policy.is_stop(token) && !params.ignore_eos {
                gens[r].finish = FinishReason::Stop;
                done[r] = true;
            }
            next.push(token);
        }
        if done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
            break;
        }
        let past = prompt_len + step;
        let positions: Vec<u32> = pad.iter().map(|&p| (past - p) as u32).collect();
        logits = policy.model.forward(
            &Tensor::from_vec(next, (b, 1), dev)?,
            &Tensor::from_vec(positions, (b, 1), dev)?,
            &padded_mask(&pad, past, 1, dev)?,
            Some(&mut cache),
        )?;
    }
    Ok(gens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[2] - lp[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn greedy_takes_the_argmax() {
        assert_eq!(draw_token(&[0.1, 3.0, 2.0], 0.0, 1.0, 0.99), 1);
    }

    #[test]
    fn draws_follow_the_cumulative_distribution() {
        // probabilities at T=1 after exp: weights 1, e, e^2 (normalised ~0.09, 0.24, 0.67).
        let logits = [0.0, 1.0, 2.0];
        assert_eq!(draw_token(&logits, 1.0, 1.0, 0.0), 0);
        assert_eq!(draw_token(&logits, 1.0, 1.0, 0.2), 1);
        assert_eq!(draw_token(&logits, 1.0, 1.0, 0.5), 2);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // With top_p 0.5 only the most likely token (0.67) survives, whatever the draw.
        let logits = [0.0, 1.0, 2.0];
        for u in [0.0, 0.3, 0.99] {
            assert_eq!(draw_token(&logits, 1.0, 0.5, u), 2);
        }
        // With 0.9 the two most likely survive: 2 then 1 in probability order.
        assert_eq!(draw_token(&logits, 1.0, 0.9, 0.95), 1);
    }
}
