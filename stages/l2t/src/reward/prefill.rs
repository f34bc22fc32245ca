//! The one pass over a chunk of rollouts that `J` and the penalty share (l2t-spec 4-5).
//!
//! The prompts' common prefix (a chat template's system turn) is computed once, then each
//! distinct prompt's rest once (a group's rollouts share theirs), then every response continues
//! its prompt's keys and values. The pass fills a KV cache, which `J`'s teacher-forced
//! continuations decode against, and keeps the residual entering the proxy block's MLP, where the
//! penalty's tangent starts: the model below the proxy block runs once for both terms.
//!
//! Layout of a chunk of `b` rollouts: `P` prompt columns, each prompt's `L` common tokens first,
//! then its padding, then the rest of it; then `R` response columns, each response right-padded.
//! Every row's prompt ends at column `P - 1` and its response starts at column `P`, so response
//! token `s` is predicted at column `P - 1 + s`. (`L` stops short of the shortest prompt, so that
//! every prompt has a rest.)

use crate::kernels::attention::MASKED;
use crate::model::qwen2::causal_mask;
use crate::model::{KvCache, Model};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// A chunk of rollouts, each distinct prompt once.
#[derive(Debug)]
pub struct SharedPrompts<'a> {
    /// The distinct prompts, in order of first use.
    prompts: Vec<&'a [u32]>,
    /// Each rollout's index in `prompts`.
    prompt_of: Vec<usize>,
    responses: Vec<&'a [u32]>,
    /// `L`: the tokens every prompt starts with, at most the shortest prompt's length less one.
    common: usize,
    /// `P` and `R`.
    prompt_cols: usize,
    response_cols: usize,
}

/// What [`SharedPrompts::prefill`] leaves: the cache of every rollout's `P + R` columns, and the
/// residual (rows, `P + R`, hidden) entering the captured layer's MLP, when asked for.
pub struct Prefill {
    /// The rollouts' keys and values, row [`Prefill::cache_row`] of the cache for each rollout
    /// (the cache holds them longest response first); a rollout's columns past its response hold
    /// zeros, which its mask hides.
    pub cache: KvCache,
    /// Each rollout's row in `cache`.
    cache_rows: Vec<u32>,
    /// In the layout's row order.
    pub mid: Option<Tensor>,
}

impl Prefill {
    /// The row of `cache` that holds rollout `row`.
    pub fn cache_row(&self, row: usize) -> u32 {
        self.cache_rows[row]
    }
}

/// Response columns a chunk of [`SharedPrompts::prefill`] spans at least, unless it is the
/// last: a chunk costs a pass through every layer, and the rows that end inside one compute its
/// remaining columns as padding.
const MIN_CHUNK_COLUMNS: usize = 8;

/// The response prefill's chunks for responses of `lens` tokens sorted longest first: column
/// ranges covering `0..lens[0]`, each with the number of rows still going at its start (a prefix
/// of the sorted rows). A chunk ends where a response ends, once it spans
/// [`MIN_CHUNK_COLUMNS`], so that rows that have ended are left out of the next chunk.
fn response_chunks(lens: &[usize]) -> Vec<(std::ops::Range<usize>, usize)> {
    let Some(&longest) = lens.first() else { return Vec::new() };
    let active = |from: usize| lens.iter().filter(|&&len| len > from).count();
    let mut chunks = Vec::new();
    let mut start = 0;
    for &end in lens.iter().rev() {
        if end >= start + MIN_CHUNK_COLUMNS && end < longest {
            chunks.push((start..end, active(start)));
            start = end;
        }
    }
    if start < longest {
        chunks.push((start..longest, active(start)));
    }
    chunks
}

impl<'a> SharedPrompts<'a> {
    /// `seqs`: (prompt, response) per rollout; prompts must not be empty (a response's first token
    /// is predicted from the prompt's last).
    pub fn new(seqs: &[(&'a [u32], &'a [u32])]) -> Result<Self> {
        let mut index: HashMap<&[u32], usize> = HashMap::new();
        let (mut prompts, mut prompt_of) = (Vec::new(), Vec::with_capacity(seqs.len()));
        for (i, &(prompt, _)) in seqs.iter().enumerate() {
            if prompt.is_empty() {
                bail!("rollout {i}: empty prompt");
            }
            prompt_of.push(*index.entry(prompt).or_insert_with(|| {
                prompts.push(prompt);
                prompts.len() - 1
            }));
        }
        let responses: Vec<&[u32]> = seqs.iter().map(|&(_, z)| z).collect();
        let prompt_cols = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let response_cols = responses.iter().map(|z| z.len()).max().unwrap_or(0);
        let common = match prompts.split_first() {
            Some((first, rest)) if !rest.is_empty() => {
                let shared = |p: &&[u32]| first.iter().zip(p.iter()).take_while(|(a, b)| a == b).count();
                rest.iter().map(shared).min().unwrap_or(0).min(prompts.iter().map(|p| p.len() - 1).min().unwrap_or(0))
            }
            // One distinct prompt is computed whole in one row: nothing to share.
            _ => 0,
        };
        Ok(Self { prompts, prompt_of, responses, common, prompt_cols, response_cols })
    }

    pub fn rows(&self) -> usize {
        self.responses.len()
    }

    /// `P + R`: the columns of every row after the pass.
    pub fn columns(&self) -> usize {
        self.prompt_cols + self.response_cols
    }

    pub fn prompt_len(&self, row: usize) -> usize {
        self.prompts[self.prompt_of[row]].len()
    }

    pub fn response_len(&self, row: usize) -> usize {
        self.responses[row].len()
    }

    /// The tokens a continuation after `row`'s first `tokens` response tokens sees: its prompt
    /// and that prefix of its response.
    pub fn prefix(&self, row: usize, tokens: usize) -> (&'a [u32], &'a [u32]) {
        (self.prompts[self.prompt_of[row]], &self.responses[row][..tokens])
    }

    /// Padding of a prompt of `len` tokens (after its common prefix).
    fn pad_of(&self, len: usize) -> usize {
        self.prompt_cols - len
    }

    /// Whether column `k` of a row whose prompt is padded by `pad` holds that prompt or one of
    /// its response's first `tokens` tokens.
    fn holds(&self, pad: usize, tokens: usize, k: usize) -> bool {
        let p = self.prompt_cols;
        k < self.common || (k >= self.common + pad && k < p) || (k >= p && k - p < tokens)
    }

    /// Whether column `k` of `row` holds its prompt or its response's first `tokens` tokens: the
    /// keys a continuation after that prefix attends to.
    pub fn in_prefix(&self, row: usize, tokens: usize, k: usize) -> bool {
        self.holds(self.pad_of(self.prompt_len(row)), tokens, k)
    }

    /// The additive mask value of key column `k` for query column `q` of a row: causal over the
    /// columns the row holds; a padding column sees only itself, so no query is fully masked.
    fn mask_value(&self, pad: usize, len: usize, q: usize, k: usize) -> f32 {
        let visible = k == q || (k < q && self.holds(pad, len, k) && self.holds(pad, len, q));
        if visible {
            0.0
        } else {
            MASKED
        }
    }

    /// The rotary position of column `c` of a row with a prompt of `prompt_len` tokens (any
    /// valid one in a padding column, which nothing attends to).
    fn position(&self, prompt_len: usize, c: usize) -> u32 {
        let pos = if c < self.common {
            c
        } else if c < self.prompt_cols {
            c.saturating_sub(self.pad_of(prompt_len))
        } else {
            prompt_len + c - self.prompt_cols
        };
        pos as u32
    }

    /// Query columns `queries` of the rows `rows` against key columns `0..queries.end`:
    /// (rows, 1, q, k).
    fn mask_rows(&self, rows: &[usize], queries: std::ops::Range<usize>, dev: &Device) -> Result<Tensor> {
        let keys = queries.end;
        let mut mask = Vec::with_capacity(rows.len() * queries.len() * keys);
        for &row in rows {
            let (pad, len) = (self.pad_of(self.prompt_len(row)), self.response_len(row));
            for q in queries.clone() {
                mask.extend((0..keys).map(|k| self.mask_value(pad, len, q, k)));
            }
        }
        Ok(Tensor::from_vec(mask, (rows.len(), 1, queries.len(), keys), dev)?)
    }

    /// The attention mask (b, 1, P + R, P + R) of the whole layout.
    pub fn mask(&self, dev: &Device) -> Result<Tensor> {
        self.mask_rows(&(0..self.rows()).collect::<Vec<_>>(), 0..self.columns(), dev)
    }

    /// Rotary positions (b, P + R).
    pub fn positions(&self, dev: &Device) -> Result<Tensor> {
        let t = self.columns();
        let pos: Vec<u32> = (0..self.rows()).flat_map(|row| (0..t).map(move |c| self.position(self.prompt_len(row), c))).collect();
        Ok(Tensor::from_vec(pos, (self.rows(), t), dev)?)
    }

    /// Tokens (b, P + R), `pad_id` in padding columns.
    pub fn tokens(&self, pad_id: u32, dev: &Device) -> Result<Tensor> {
        let (p, r) = (self.prompt_cols, self.response_cols);
        let mut tokens = Vec::with_capacity(self.rows() * (p + r));
        for (row, response) in self.responses.iter().enumerate() {
            tokens.extend(self.prompt_columns(self.prompts[self.prompt_of[row]], pad_id));
            tokens.extend(response.iter().copied().chain(std::iter::repeat_n(pad_id, r - response.len())));
        }
        Ok(Tensor::from_vec(tokens, (self.rows(), p + r), dev)?)
    }

    /// A prompt's `P` columns: its common prefix, its padding, its rest.
    fn prompt_columns<'p>(&self, prompt: &'p [u32], pad_id: u32) -> impl Iterator<Item = u32> + 'p {
        let (common, rest) = prompt.split_at(self.common);
        common.iter().copied().chain(std::iter::repeat_n(pad_id, self.pad_of(prompt.len()))).chain(rest.iter().copied())
    }

    /// The token each column predicts (b, P + R): response token `s` at column `P - 1 + s`,
    /// `pad_id` where a column predicts no response token.
    pub fn targets(&self, pad_id: u32, dev: &Device) -> Result<Tensor> {
        let t = self.columns();
        let mut targets = vec![pad_id; self.rows() * t];
        for (row, response) in self.responses.iter().enumerate() {
            let from = row * t + self.response_offset();
            targets[from..from + response.len()].copy_from_slice(response);
        }
        Ok(Tensor::from_vec(targets, (self.rows(), t), dev)?)
    }

    /// The column predicting each row's first response token (the last prompt column).
    pub fn response_offset(&self) -> usize {
        self.prompt_cols - 1
    }

    /// Each row's columns that predict its response tokens: (from, len).
    pub fn response_windows(&self) -> Vec<(usize, usize)> {
        self.responses.iter().map(|z| (self.response_offset(), z.len())).collect()
    }

    /// Runs `model` over the layout into a cache with room for `extra` more columns, capturing
    /// the residual entering layer `capture`'s MLP when asked: the prompts' common prefix first
    /// (one row), then the rest of each distinct prompt after a copy of it, their cache rows then
    /// copied to their rollouts, then the responses in chunks of columns, each over the rows
    /// whose responses reach it ([`response_chunks`]).
    pub fn prefill(&self, model: &Model, pad_id: u32, capture: Option<usize>, extra: usize) -> Result<Prefill> {
        let dev = model.device();
        let (l, p, t) = (self.common, self.prompt_cols, self.columns());
        let u = self.prompts.len();
        let mut prompt_cache = KvCache::with_capacity(model.cfg.num_hidden_layers, t + extra);
        let mut common_mid = None;
        if l > 0 {
            let tokens = Tensor::from_vec(self.prompts[0][..l].to_vec(), (1, l), &dev)?;
            let positions = Tensor::arange(0u32, l as u32, &dev)?.unsqueeze(0)?;
            let mid = model.prefill(&tokens, &positions, &causal_mask(1, l, &dev)?, &mut prompt_cache, capture)?;
            let copies = Tensor::from_vec(vec![0u32; u], u, &dev)?;
            prompt_cache = prompt_cache.select_rows(&copies)?;
            common_mid = mid.map(|m| m.index_select(&copies, 0)).transpose()?;
        }
        let mut tokens = Vec::with_capacity(u * (p - l));
        let (mut positions, mut mask) = (Vec::with_capacity(u * (p - l)), Vec::with_capacity(u * (p - l) * p));
        for prompt in &self.prompts {
            let pad = self.pad_of(prompt.len());
            tokens.extend(self.prompt_columns(prompt, pad_id).skip(l));
            positions.extend((l..p).map(|c| self.position(prompt.len(), c)));
            mask.extend((l..p).flat_map(|q| (0..p).map(move |k| self.mask_value(pad, 0, q, k))));
        }
        let rest_mid = model.prefill(
            &Tensor::from_vec(tokens, (u, p - l), &dev)?,
            &Tensor::from_vec(positions, (u, p - l), &dev)?,
            &Tensor::from_vec(mask, (u, 1, p - l, p), &dev)?,
            &mut prompt_cache,
            capture,
        )?;
        let prompt_mid = match (common_mid, rest_mid) {
            (Some(common), Some(rest)) => Some(Tensor::cat(&[common, rest], 1)?),
            (_, rest) => rest,
        };
        let rows = Tensor::from_vec(self.prompt_of.iter().map(|&i| i as u32).collect::<Vec<_>>(), self.rows(), &dev)?;
        let prompt_mid = prompt_mid.map(|m| m.index_select(&rows, 0)).transpose()?;
        // The responses longest first, so that the rows still going at any column are a prefix
        // of the cache's rows: each chunk of columns runs over those rows only, and no pass is
        // spent on the padding of responses that have ended (EOS leaves responses of many
        // lengths).
        let mut order: Vec<usize> = (0..self.rows()).collect();
        order.sort_by_key(|&row| std::cmp::Reverse(self.response_len(row)));
        let mut cache_rows = vec![0u32; self.rows()];
        for (at, &row) in order.iter().enumerate() {
            cache_rows[row] = at as u32;
        }
        let by_length = Tensor::from_vec(order.iter().map(|&row| self.prompt_of[row] as u32).collect::<Vec<_>>(), order.len(), &dev)?;
        let mut cache = prompt_cache.select_rows(&by_length)?;
        let lens: Vec<usize> = order.iter().map(|&row| self.response_len(row)).collect();
        let mut response_mids = Vec::new();
        for (columns, active) in response_chunks(&lens) {
            let rows = &order[..active];
            let n = columns.len();
            let (mut tokens, mut positions) = (Vec::with_capacity(active * n), Vec::with_capacity(active * n));
            for &row in rows {
                let response = self.responses[row];
                tokens.extend(columns.clone().map(|c| response.get(c).copied().unwrap_or(pad_id)));
                positions.extend(columns.clone().map(|c| self.position(self.prompt_len(row), p + c)));
            }
            let chunk_mid = model.prefill(
                &Tensor::from_vec(tokens, (active, n), &dev)?,
                &Tensor::from_vec(positions, (active, n), &dev)?,
                &self.mask_rows(rows, p + columns.start..p + columns.end, &dev)?,
                &mut cache,
                capture,
            )?;
            if let Some(m) = chunk_mid {
                // The rows that have ended get zeros (no target is scored there).
                let (_, _, hidden) = m.dims3()?;
                let rest = Tensor::zeros((self.rows() - active, n, hidden), m.dtype(), m.device())?;
                response_mids.push(Tensor::cat(&[m, rest], 0)?);
            }
        }
        let mid = match prompt_mid {
            Some(prompt) if response_mids.is_empty() => Some(prompt),
            Some(prompt) => {
                let back = Tensor::from_vec(cache_rows.clone(), self.rows(), &dev)?;
                Some(Tensor::cat(&[prompt, Tensor::cat(&response_mids, 1)?.index_select(&back, 0)?], 1)?)
            }
            None => None,
        };
        if cache.len() != t {
            bail!("prefill: {} cached columns for a layout of {t}", cache.len());
        }
        Ok(Prefill { cache, cache_rows, mid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build_model, init_weights};

    /// Two prompts, then three responses.
    fn seqs() -> [Vec<u32>; 5] {
        [vec![3, 4, 5], vec![7, 8], vec![20, 21, 22, 23], vec![30], vec![40, 41, 42]]
    }

    /// Three rollouts, two sharing a prompt: the layout by hand.
    #[test]
    fn the_layout_by_hand() {
        let [p1, p2, z1, z2, z3] = seqs();
        let layout = SharedPrompts::new(&[(&p1, &z1), (&p2, &z2), (&p1, &z3)]).unwrap();
        let dev = Device::Cpu;
        assert_eq!((layout.rows(), layout.columns(), layout.response_offset()), (3, 7, 2));
        let tokens: Vec<Vec<u32>> = layout.tokens(0, &dev).unwrap().to_vec2().unwrap();
        assert_eq!(tokens, [vec![3, 4, 5, 20, 21, 22, 23], vec![0, 7, 8, 30, 0, 0, 0], vec![3, 4, 5, 40, 41, 42, 0]]);
        let positions: Vec<Vec<u32>> = layout.positions(&dev).unwrap().to_vec2().unwrap();
        assert_eq!(positions[1], [0, 0, 1, 2, 3, 4, 5]);
        assert_eq!(positions[2], [0, 1, 2, 3, 4, 5, 6]);
        let targets: Vec<Vec<u32>> = layout.targets(0, &dev).unwrap().to_vec2().unwrap();
        assert_eq!(targets, [vec![0, 0, 20, 21, 22, 23, 0], vec![0, 0, 30, 0, 0, 0, 0], vec![0, 0, 40, 41, 42, 0, 0]]);
        assert_eq!(layout.response_windows(), [(2, 4), (2, 1), (2, 3)]);
        // Row 1: its pad column and its response's padding see only themselves.
        let mask: Vec<Vec<f32>> = layout.mask(&dev).unwrap().get(1).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let seen = |q: usize| -> Vec<usize> { (0..7).filter(|&k| mask[q][k] == 0.0).collect() };
        assert_eq!((seen(0), seen(2), seen(3), seen(5)), (vec![0], vec![1, 2], vec![1, 2, 3], vec![5]));
        assert!(layout.in_prefix(1, 0, 2) && !layout.in_prefix(1, 0, 3) && layout.in_prefix(1, 1, 3) && !layout.in_prefix(1, 1, 0));
        assert!(SharedPrompts::new(&[(&[], &z1)]).is_err());
    }

    /// Prompts that start alike: their common prefix (short of the shortest prompt) comes
    /// first, then each prompt's padding and rest; positions skip the padding.
    #[test]
    fn a_common_prefix_comes_first() {
        let (p1, p2, p3) = (vec![1u32, 2, 3, 4], vec![1u32, 2, 9], vec![1u32, 2, 3]);
        let (z1, z2) = (vec![20u32, 21], vec![30u32]);
        let layout = SharedPrompts::new(&[(&p1, &z1), (&p2, &z2), (&p3, &z1)]).unwrap();
        let dev = Device::Cpu;
        assert_eq!((layout.common, layout.columns(), layout.response_offset()), (2, 6, 3));
        let tokens: Vec<Vec<u32>> = layout.tokens(0, &dev).unwrap().to_vec2().unwrap();
        assert_eq!(tokens, [vec![1, 2, 3, 4, 20, 21], vec![1, 2, 0, 9, 30, 0], vec![1, 2, 0, 3, 20, 21]]);
        let positions: Vec<Vec<u32>> = layout.positions(&dev).unwrap().to_vec2().unwrap();
        assert_eq!(
            (positions[0].clone(), &positions[1][..2], &positions[1][3..]),
            (vec![0, 1, 2, 3, 4, 5], &[0u32, 1][..], &[2u32, 3, 4][..])
        );
        // Row 1 sees its common prefix and its rest, not its padding.
        assert!(layout.in_prefix(1, 0, 1) && !layout.in_prefix(1, 0, 2) && layout.in_prefix(1, 0, 3) && !layout.in_prefix(1, 0, 4));
        // A prompt that is the others' prefix keeps a rest of one token; one distinct prompt shares nothing.
        let short = SharedPrompts::new(&[(&p3[..2], &z2), (&p1, &z1)]).unwrap();
        assert_eq!((short.common, short.response_offset()), (1, 3));
        assert_eq!(SharedPrompts::new(&[(&p1, &z1), (&p1, &z2)]).unwrap().common, 0);
    }

    /// Chunks end where responses end, once they span the minimum; the rows still going at a
    /// chunk's start are counted.
    #[test]
    fn response_chunks_by_hand() {
        assert_eq!(MIN_CHUNK_COLUMNS, 8, "the cases below assume chunks of at least 8 columns");
        // Ends at 2 (too soon), 10, 10, 13 (too soon after 10), 20 (the longest).
        assert_eq!(response_chunks(&[20, 13, 10, 10, 2]), vec![(0..10, 5), (10..20, 2)]);
        assert_eq!(response_chunks(&[64, 64, 64]), vec![(0..64, 3)]);
        assert_eq!(response_chunks(&[30, 9, 0]), vec![(0..9, 2), (9..30, 1)]);
        assert_eq!(response_chunks(&[5, 1]), vec![(0..5, 2)]);
        assert!(response_chunks(&[0, 0]).is_empty() && response_chunks(&[]).is_empty());
    }

    /// The shared pass leaves the cache and the captured residual that one pass over each whole
    /// rollout gives, with and without a common prefix, and with responses long enough to run in
    /// chunks over fewer rows.
    #[test]
    fn sharing_prompts_changes_no_value() {
        let cfg = crate::model::test_config(32, 48, 2, 4, 2);
        let dev = Device::Cpu;
        let model = build_model(&cfg, &init_weights(&cfg, 3, &dev).unwrap(), &dev).unwrap();
        let [p1, p2, z1, z2, z3] = seqs();
        let (q1, q2) = (vec![3u32, 4, 5, 6], vec![3u32, 4, 8]);
        let (long, middle): (Vec<u32>, Vec<u32>) = ((0..21).map(|i| 10 + i % 17).collect(), (0..11).map(|i| 12 + i).collect());
        let chunks: [[(&[u32], &[u32]); 3]; 3] =
            [[(&p1, &z1), (&p2, &z2), (&p1, &z3)], [(&q1, &z1), (&q2, &z2), (&q1, &z3)], [(&p1, &middle), (&p2, &z2), (&p1, &long)]];
        for seqs in chunks {
            let layout = SharedPrompts::new(&seqs).unwrap();
            let shared = layout.prefill(&model, 0, Some(1), 0).unwrap();
            let mid = shared.mid.unwrap();
            let whole =
                model.forward_to_mlp(&layout.tokens(0, &dev).unwrap(), &layout.positions(&dev).unwrap(), &layout.mask(&dev).unwrap(), 1);
            let whole = whole.unwrap();
            let columns = layout.columns();
            for row in 0..3 {
                // Only the columns a row holds carry meaning.
                let held: Vec<usize> = (0..columns).filter(|&c| layout.in_prefix(row, layout.response_len(row), c)).collect();
                for c in held {
                    let diff = (mid.get(row).unwrap().get(c).unwrap() - whole.get(row).unwrap().get(c).unwrap()).unwrap();
                    let err = diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(err < 1e-5, "common {} row {row} column {c}: {err}", layout.common);
                }
            }
            assert_eq!(shared.cache.len(), columns);
        }
    }
}
