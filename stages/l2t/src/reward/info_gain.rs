//! Fitting information gain (l2t-spec section 4): `J(i,k)`, the policy's probability of the gold
//! answer if the reasoning were cut after episode `k`, and `dI(i,k) = J(i,k) - J(i,k-1)`.
//!
//! All `K_i + 1` prefixes of a rollout share the response prefix: one cached pass over prompt and
//! response ([`super::prefill`], shared with the penalty), then one short teacher-forced
//! continuation (`close`, then the answer) per boundary, every continuation of a batch decoded
//! together against the rows of that one cache.

use super::prefill::{Prefill, SharedPrompts};
use crate::config::JMode;
use crate::kernels::attention::MASKED;
use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// `J` from the log-probabilities of the answer tokens `a*` (spec 4: "the product of the answer
/// tokens' probabilities", or their geometric mean).
pub fn j_prefix(answer_logprobs: &[f64], mode: JMode) -> f64 {
    let sum: f64 = answer_logprobs.iter().sum();
    match mode {
        JMode::Prob => sum.exp(),
        JMode::Geomean => (sum / answer_logprobs.len().max(1) as f64).exp(),
    }
}

/// `dI(i,k) = J(i,k) - J(i,k-1)`, k = 1..K, from `J(i,0..=K)` (spec 4).
pub fn delta_i(j: &[f64]) -> Vec<f64> {
    j.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Bytes of cache rows that one batch of [`j_values`]'s continuations may copy.
pub const CONTINUATION_CACHE_BYTES: usize = 256 << 20;

/// What one decoded row asks: (prompt, response prefix, continuation).
type Question<'a> = (&'a [u32], &'a [u32], &'a [u32]);

/// One rollout's question to the policy.
#[derive(Debug, Clone)]
pub struct JRequest {
    /// Response-token end of each episode's prefix, `end_1..end_K` (non-decreasing, at most the
    /// response length). `J(i,0)` uses the prompt alone.
    pub ends: Vec<usize>,
    /// `close` then the gold answer `a*`: the tokens teacher-forced after each prefix.
    pub continuation: Vec<u32>,
    /// How many trailing tokens of `continuation` are `a*` (the scored ones).
    pub answer_len: usize,
}

/// `J(i,0..=K)` for every rollout of `layout` (`requests[i]` for its row `i`), under `model` and
/// without gradient, from the cache `prefill` left ([`SharedPrompts::prefill`] with `extra` at
/// least the longest continuation): one row per distinct question, each seeing its own prefix of
/// its rollout's cache, the rows decoded in batches whose copies of those cache rows stay under
/// `cache_bytes` ([`CONTINUATION_CACHE_BYTES`]; at least one row a batch).
pub fn j_values(
    model: &Model,
    layout: &SharedPrompts,
    prefill: &Prefill,
    pad_id: u32,
    requests: &[JRequest],
    mode: JMode,
    cache_bytes: usize,
) -> Result<Vec<Vec<f64>>> {
    if requests.len() != layout.rows() {
        bail!("{} J requests for {} rollouts", requests.len(), layout.rows());
    }
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let dev = model.device();
    for (i, r) in requests.iter().enumerate() {
        let close_len = r.continuation.len().saturating_sub(r.answer_len);
        if r.answer_len == 0 || close_len == 0 {
            bail!("request {i}: needs a non-empty close suffix and a non-empty answer");
        }
        if r.ends.windows(2).any(|w| w[1] < w[0]) || r.ends.iter().any(|&e| e > layout.response_len(i)) {
            bail!("request {i}: episode ends {:?} are not ordered within the response", r.ends);
        }
    }
    let l = layout.columns();
    // One decoded row per distinct (prompt, response prefix, continuation): `J(i,0)` of a group's
    // rollouts, boundaries that share an end and rollouts that share a prefix ask the same
    // question. (On the packed CPU path a row's result does not depend on the rows decoded beside
    // it, so asking once changes no bit there.)
    let mut rows: Vec<(usize, usize)> = Vec::new(); // (rollout, response tokens in the prefix)
    let mut distinct: HashMap<Question, usize> = HashMap::new();
    let row_of: Vec<Vec<usize>> = requests
        .iter()
        .enumerate()
        .map(|(r, req)| {
            std::iter::once(0)
                .chain(req.ends.iter().copied())
                .map(|end| {
                    let (prompt, prefix) = layout.prefix(r, end);
                    *distinct.entry((prompt, prefix, &req.continuation[..])).or_insert_with(|| {
                        rows.push((r, end));
                        rows.len() - 1
                    })
                })
                .collect()
        })
        .collect();
    let c = requests.iter().map(|r| r.continuation.len() - 1).max().unwrap_or(1);
    // The head runs only from the earliest input that predicts an answer token: the close
    // suffix before it is only read through the cache.
    let first = |req: &JRequest| req.continuation.len() - req.answer_len - 1; // the input index predicting a*_0
    let from = requests.iter().map(first).min().unwrap_or(0);
    // Each decoded row takes a copy of its rollout's cache rows: as many rows at once as keep
    // those copies under `cache_bytes` (long responses with many episodes would
    // otherwise copy the cache once per question, all at once).
    let per_batch = (cache_bytes / prefill.cache.row_bytes()?.max(1)).max(1);
    let mut logp: Vec<Vec<f32>> = Vec::with_capacity(rows.len());
    for batch in rows.chunks(per_batch) {
        let n = batch.len();
        let (mut inputs, mut targets, mut pos) = (vec![pad_id; n * c], vec![pad_id; n * c], vec![0u32; n * c]);
        let mut mask = vec![MASKED; n * c * (l + c)];
        for (row, &(r, prefix)) in batch.iter().enumerate() {
            let cont = &requests[r].continuation;
            for m in 0..c {
                let at = row * c + m;
                if m + 1 < cont.len() {
                    inputs[at] = cont[m];
                    targets[at] = cont[m + 1];
                }
                pos[at] = (layout.prompt_len(r) + prefix + m) as u32;
                let keys = &mut mask[at * (l + c)..(at + 1) * (l + c)];
                for (k, key) in keys[..l].iter_mut().enumerate() {
                    if layout.in_prefix(r, prefix, k) {
                        *key = 0.0;
                    }
                }
                keys[l..=l + m].iter_mut().for_each(|k| *k = 0.0);
            }
        }
        let select = Tensor::from_vec(batch.iter().map(|&(r, _)| prefill.cache_row(r)).collect::<Vec<_>>(), n, &dev)?;
        let mut row_cache = prefill.cache.select_rows(&select)?;
        logp.extend(
            model
                .target_logprobs_window(
                    &Tensor::from_vec(inputs, (n, c), &dev)?,
                    &Tensor::from_vec(pos, (n, c), &dev)?,
                    &Tensor::from_vec(mask, (n, 1, c, l + c), &dev)?,
                    Some(&mut row_cache),
                    &Tensor::from_vec(targets, (n, c), &dev)?,
                    (from, c - from),
                )?
                .to_vec2::<f32>()?,
        );
    }
    let j: Vec<f64> = rows
        .iter()
        .zip(&logp)
        .map(|(&(r, _), logp)| {
            let req = &requests[r];
            let at = first(req) - from;
            let answer: Vec<f64> = logp[at..at + req.answer_len].iter().map(|&v| f64::from(v)).collect();
            j_prefix(&answer, mode)
        })
        .collect();
    Ok(row_of.iter().map(|rows| rows.iter().map(|&row| j[row]).collect()).collect())
}

/// The cache room [`j_values`] needs after the prefill: the longest continuation.
pub fn continuation_room(requests: &[JRequest]) -> usize {
    requests.iter().map(|r| r.continuation.len().saturating_sub(1)).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::qwen2::causal_mask;
    use crate::model::{build_model, init_weights, token_logprobs};
    use candle_core::Device;

    #[test]
    fn j_is_the_product_or_geometric_mean_of_answer_probabilities() {
        // P(a*) = 0.5 * 0.25 = 0.125; geometric mean sqrt(0.125) ~ 0.35355.
        let lp = [0.5f64.ln(), 0.25f64.ln()];
        assert!((j_prefix(&lp, JMode::Prob) - 0.125).abs() < 1e-12);
        assert!((j_prefix(&lp, JMode::Geomean) - 0.125f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn delta_i_telescopes_to_j_k_minus_j_0() {
        // J = 0.1, 0.3, 0.25, 0.9: dI = 0.2, -0.05, 0.65; their sum is J(K) - J(0) = 0.8.
        let j = [0.1, 0.3, 0.25, 0.9];
        let d = delta_i(&j);
        let want = [0.2, -0.05, 0.65];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{d:?}");
        }
        assert!((d.iter().sum::<f64>() - (j[3] - j[0])).abs() < 1e-12);
    }

    /// The cached, batched J equals scoring each full sequence (prompt, prefix, close, answer)
    /// from scratch.
    #[test]
    fn cached_j_matches_scoring_each_prefix_from_scratch() {
        let cfg = crate::model::test_config(32, 48, 2, 4, 2);
        let dev = Device::Cpu;
        let model = build_model(&cfg, &init_weights(&cfg, 5, &dev).unwrap(), &dev).unwrap();
        // The two prompts share their first two tokens: the pass computes them once.
        let (p1, p2) = (vec![3u32, 4, 5], vec![3u32, 4, 9, 10, 11]);
        // Responses of 21 and 10 tokens: the pass runs a chunk of columns over every row, then
        // one over the two rows of 21 only.
        let (z1, z2): (Vec<u32>, Vec<u32>) = ((0..21).map(|i| 20 + i % 9).collect(), (0..10).map(|i| 30 + i % 4).collect());
        let requests = vec![
            JRequest { ends: vec![2, 5, 6, 15, 21], continuation: vec![40, 41, 50, 51, 52], answer_len: 3 },
            JRequest { ends: vec![1, 2, 10], continuation: vec![40, 60], answer_len: 1 },
            JRequest { ends: vec![0, 2, 9], continuation: vec![41, 61, 62], answer_len: 2 },
            JRequest { ends: vec![2, 3, 18], continuation: vec![40, 41, 50, 51, 52], answer_len: 3 },
        ];
        // The third and fourth rollouts share the first's prompt: one prompt row for all three.
        // Questions asked twice (the third's J(0) and J(1); the fourth's J(0) and J(1), which are
        // the first's) are decoded once.
        let seqs: [(&[u32], &[u32]); 4] = [(&p1, &z1), (&p2, &z2), (&p1, &z2), (&p1, &z1)];
        let layout = SharedPrompts::new(&seqs).unwrap();
        let prefill = layout.prefill(&model, 0, None, continuation_room(&requests)).unwrap();
        let got = j_values(&model, &layout, &prefill, 0, &requests, JMode::Prob, CONTINUATION_CACHE_BYTES).unwrap();
        // One row at a time (the smallest copy budget) gives the same values.
        let one_by_one = j_values(&model, &layout, &prefill, 0, &requests, JMode::Prob, 1).unwrap();
        for (a, b) in one_by_one.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() < 1e-5 * b.max(1e-3), "{a} vs {b}");
        }
        for (r, (req, (prompt, response))) in requests.iter().zip(seqs).enumerate() {
            let prefixes = std::iter::once(0).chain(req.ends.iter().copied());
            for (k, end) in prefixes.enumerate() {
                let seq: Vec<u32> = prompt.iter().chain(&response[..end]).chain(&req.continuation).copied().collect();
                let t = seq.len() - 1;
                let inputs = Tensor::from_vec(seq[..t].to_vec(), (1, t), &dev).unwrap();
                let targets = Tensor::from_vec(seq[1..].to_vec(), (1, t), &dev).unwrap();
                let pos = Tensor::arange(0u32, t as u32, &dev).unwrap().unsqueeze(0).unwrap();
                let logits = model.forward(&inputs, &pos, &causal_mask(1, t, &dev).unwrap(), None).unwrap();
                let lp: Vec<f32> = token_logprobs(&logits, &targets).unwrap().get(0).unwrap().to_vec1().unwrap();
                let answer: Vec<f64> = lp[t - req.answer_len..].iter().map(|&v| f64::from(v)).collect();
                let want = j_prefix(&answer, JMode::Prob);
                assert!((got[r][k] - want).abs() < 1e-5 * want.max(1e-3), "request {r} k {k}: {} vs {want}", got[r][k]);
            }
        }
    }
}
