//! Batched sampling with a KV cache (l2t-spec section 1).
//!
//! Prompts of different lengths share a batch through left padding with per-row positions. Every
//! row draws from its own generator, seeded per (run seed, iteration, prompt, sample), so a
//! rollout does not depend on which rows it was batched with.

use crate::kernels::vexp;
use crate::model::qwen2::padded_mask;
use crate::model::{KvCache, Policy};
use crate::table::rollouts::FinishReason;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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
    // Weights exp((l - max) / T) in f32 (vectorised), summed and walked in f64.
    let mut weights = vec![0f32; logits.len()];
    vexp::exp_scaled(logits, vexp::max(logits), (1.0 / temperature) as f32, Some(&mut weights));
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    if top_p >= 1.0 {
        // No truncation: walk the cumulative distribution in id order, no candidate list.
        let target = u * total;
        let mut acc = 0.0;
        for (i, &w) in weights.iter().enumerate() {
            acc += w as f64;
            if acc > target {
                return i as u32;
            }
        }
        return (weights.len() - 1) as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut kept = 0.0;
    let mut n = 0;
    while n < order.len() && kept < top_p * total {
        kept += weights[order[n]] as f64;
        n += 1;
    }
    order.truncate(n.max(1));
    let mass: f64 = order.iter().map(|&i| weights[i] as f64).sum();
    let target = u * mass;
    let mut acc = 0.0;
    for &i in &order {
        acc += weights[i] as f64;
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
        out.extend(crate::kernels::with_pool_awake(|| generate_batch(policy, chunk, params)).context("sampling a batch")?);
        on_batch_done(chunk.len());
    }
    Ok(out)
}

/// One batch: the distinct prompts are prefilled once (a group's G rows share their prompt's
/// keys and values), then every row decodes from its own copy of the cache; rows that finish
/// leave the batch, so the remaining steps compute only live rows.
fn generate_batch(policy: &Policy, rows: &[Request], params: &SamplerParams) -> Result<Vec<Generation>> {
    let dev = &policy.device;
    let b = rows.len();
    // Distinct prompts, and the distinct prompt of each row.
    let mut prompts: Vec<&[u32]> = Vec::new();
    let mut source = Vec::with_capacity(b);
    for r in rows {
        let i = prompts.iter().position(|p| *p == r.prompt_ids.as_slice()).unwrap_or_else(|| {
            prompts.push(&r.prompt_ids);
            prompts.len() - 1
        });
        source.push(i as u32);
    }
    let prompt_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let prompt_pad: Vec<usize> = prompts.iter().map(|p| prompt_len - p.len()).collect();
    let mut tokens = Vec::with_capacity(prompts.len() * prompt_len);
    let mut positions = Vec::with_capacity(prompts.len() * prompt_len);
    for (p, prompt) in prompts.iter().enumerate() {
        tokens.extend(std::iter::repeat_n(policy.pad_id, prompt_pad[p]).chain(prompt.iter().copied()));
        positions.extend((0..prompt_len).map(|j| j.saturating_sub(prompt_pad[p]) as u32));
    }
    let u = prompts.len();
    let mut cache = KvCache::with_capacity(policy.cfg.num_hidden_layers, prompt_len + params.max_new_tokens);
    let mut logits = policy.model.forward_last(
        &Tensor::from_vec(tokens, (u, prompt_len), dev)?,
        &Tensor::from_vec(positions, (u, prompt_len), dev)?,
        &padded_mask(&prompt_pad, 0, prompt_len, dev)?,
        Some(&mut cache),
    )?;
    if u < b {
        let select = Tensor::from_vec(source.clone(), b, dev)?;
        cache = cache.select_rows(&select)?;
        logits = logits.index_select(&select, 0)?;
    }
    let mut rngs: Vec<ChaCha8Rng> = rows.iter().map(|r| ChaCha8Rng::seed_from_u64(r.seed)).collect();
    let mut gens: Vec<Generation> =
        (0..b).map(|_| Generation { tokens: Vec::new(), logprobs: Vec::new(), finish: FinishReason::Length }).collect();
    // The rows still decoding, in batch order, and their left padding.
    let mut live: Vec<usize> = (0..b).collect();
    let mut pad: Vec<usize> = source.iter().map(|&i| prompt_pad[i as usize]).collect();
    for step in 0..params.max_new_tokens {
        let last: Vec<Vec<f32>> = logits.to_vec2()?;
        // Each row's uniform comes from its own generator, so the rows draw in parallel.
        let uniforms: Vec<f64> = live.iter().map(|&r| rngs[r].random()).collect();
        let drawn: Vec<(u32, f32)> = last
            .par_iter()
            .zip(uniforms.par_iter())
            .map(|(row, &u)| {
                let token = draw_token(row, params.temperature, params.top_p, u);
                (token, token_logprob(row, token))
            })
            .collect();
        let mut next = Vec::with_capacity(live.len());
        let mut keep = Vec::with_capacity(live.len());
        for (j, (&r, &(token, logprob))) in live.iter().zip(&drawn).enumerate() {
            gens[r].tokens.push(token);
            gens[r].logprobs.push(logprob);
            if policy.is_stop(token) && !params.ignore_eos {
                gens[r].finish = FinishReason::Stop;
            } else {
                keep.push(j);
                next.push(token);
            }
        }
        if keep.is_empty() || step + 1 == params.max_new_tokens {
            break;
        }
        if keep.len() < live.len() {
            let select = Tensor::from_vec(keep.iter().map(|&j| j as u32).collect::<Vec<_>>(), keep.len(), dev)?;
            cache = cache.select_rows(&select)?;
            live = keep.iter().map(|&j| live[j]).collect();
            pad = keep.iter().map(|&j| pad[j]).collect();
        }
        let past = prompt_len + step;
        let positions: Vec<u32> = pad.iter().map(|&p| (past - p) as u32).collect();
        logits = policy.model.forward_last(
            &Tensor::from_vec(next, (live.len(), 1), dev)?,
            &Tensor::from_vec(positions, (live.len(), 1), dev)?,
            &padded_mask(&pad, past, 1, dev)?,
            Some(&mut cache),
        )?;
    }
    Ok(gens)
}

/// log-softmax of one row at `token`, without materialising the whole row.
pub fn token_logprob(logits: &[f32], token: u32) -> f32 {
    logits[token as usize] - vexp::log_sum_exp(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, tokenizer};
    use candle_core::Device;

    /// A random tiny policy (GQA: 4 query heads over 2 kv heads) with a tokenizer.
    fn policy() -> Policy {
        let dev = Device::Cpu;
        let tok = tokenizer::train(&vec!["<think><episode_1>12 + 3 = 15</episode_1></think>\n\\boxed{15}".to_string(); 8], 300).unwrap();
        let cfg = model::test_config(32, 64, 2, 4, 2);
        Policy::from_parts(&cfg, &model::init_weights(&cfg, 7, &dev).unwrap(), tok, &dev).unwrap()
    }

    fn requests() -> Vec<Request> {
        // Two groups of three rows sharing a prompt, and a single row; prompts of three lengths.
        let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9], &[10, 11], &[12, 13, 14]];
        [0usize, 0, 0, 1, 1, 1, 2]
            .iter()
            .enumerate()
            .map(|(i, &p)| Request { prompt_ids: prompts[p].to_vec(), seed: 100 + i as u64 })
            .collect()
    }

    #[test]
    fn batched_and_single_row_sampling_give_the_same_tokens() {
        let policy = policy();
        let params = SamplerParams { temperature: 1.0, top_p: 1.0, max_new_tokens: 12, ignore_eos: false };
        let batched = generate(&policy, &requests(), &params, 7, |_| {}).unwrap();
        let single = generate(&policy, &requests(), &params, 1, |_| {}).unwrap();
        for (i, (a, b)) in batched.iter().zip(&single).enumerate() {
            assert_eq!((&a.tokens, a.finish), (&b.tokens, b.finish), "row {i}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-5, "row {i}: logprob {x} vs {y}");
            }
        }
        // Rows left the batch as they finished: some stopped early, others ran on.
        let lengths: Vec<usize> = batched.iter().map(|g| g.tokens.len()).collect();
        assert!(lengths.iter().any(|&n| n < 12) || lengths.iter().all(|&n| n == 12), "{lengths:?}");
        let fixed = SamplerParams { ignore_eos: true, ..params };
        assert!(generate(&policy, &requests(), &fixed, 7, |_| {}).unwrap().iter().all(|g| g.tokens.len() == 12));
    }

    #[test]
    fn prefix_shared_and_unshared_prefill_give_the_same_logits() {
        let policy = policy();
        let dev = Device::Cpu;
        let rows = requests();
        let len = rows.iter().map(|r| r.prompt_ids.len()).max().unwrap();
        let pad: Vec<usize> = rows.iter().map(|r| len - r.prompt_ids.len()).collect();
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            tokens.extend(std::iter::repeat_n(policy.pad_id, pad[r]).chain(row.prompt_ids.iter().copied()));
            positions.extend((0..len).map(|j| j.saturating_sub(pad[r]) as u32));
        }
        let b = rows.len();
        let mut cache = KvCache::new(policy.cfg.num_hidden_layers);
        let unshared = policy
            .model
            .forward_last(
                &Tensor::from_vec(tokens, (b, len), &dev).unwrap(),
                &Tensor::from_vec(positions, (b, len), &dev).unwrap(),
                &padded_mask(&pad, 0, len, &dev).unwrap(),
                Some(&mut cache),
            )
            .unwrap();
        // The sampler's path: distinct prompts once, then rows selected; compare its first draws'
        // distribution through the logprob of every token.
        let params = SamplerParams { temperature: 1.0, top_p: 1.0, max_new_tokens: 1, ignore_eos: true };
        let shared = generate(&policy, &rows, &params, b, |_| {}).unwrap();
        let unshared: Vec<Vec<f32>> = unshared.to_vec2().unwrap();
        for (r, g) in shared.iter().enumerate() {
            let want = token_logprob(&unshared[r], g.tokens[0]);
            assert!((g.logprobs[0] - want).abs() < 1e-5, "row {r}: {} vs {want}", g.logprobs[0]);
        }
        // And the logits themselves: prefill of the distinct prompts, rows selected.
        let distinct = [0usize, 3, 6];
        let sel = Tensor::from_vec(vec![0u32, 0, 0, 1, 1, 1, 2], 7, &dev).unwrap();
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for &r in &distinct {
            tokens.extend(std::iter::repeat_n(policy.pad_id, pad[r]).chain(rows[r].prompt_ids.iter().copied()));
            positions.extend((0..len).map(|j| j.saturating_sub(pad[r]) as u32));
        }
        let dpad: Vec<usize> = distinct.iter().map(|&r| pad[r]).collect();
        let mut cache = KvCache::new(policy.cfg.num_hidden_layers);
        let logits = policy
            .model
            .forward_last(
                &Tensor::from_vec(tokens, (3, len), &dev).unwrap(),
                &Tensor::from_vec(positions, (3, len), &dev).unwrap(),
                &padded_mask(&dpad, 0, len, &dev).unwrap(),
                Some(&mut cache),
            )
            .unwrap()
            .index_select(&sel, 0)
            .unwrap();
        let shared: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for r in 0..b {
            let diff = shared[r].iter().zip(&unshared[r]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "row {r}: max abs logit difference {diff}");
        }
    }

    #[test]
    fn token_logprob_normalises() {
        let logits = [1.0, 2.0, 3.0];
        let total: f32 = (0..3).map(|t| token_logprob(&logits, t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((token_logprob(&logits, 2) - token_logprob(&logits, 1) - 1.0).abs() < 1e-6);
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
