//! The decoder's training pass on the CPU in f32, forward and backward written out by hand.
//!
//! candle's autograd gives every op of the graph its own output buffer and, in the backward pass,
//! a zero-filled gradient buffer plus an add per contribution, with copies around attention's
//! transposes; on a small model that bookkeeping cost as much as the matrix products. Here a pass
//! is a fixed sequence of products (`gemm`, the kernels candle's CPU matmul calls) and row kernels
//! over buffers it owns, the activations the backward pass reads are kept in a [`Tape`], and each
//! weight's gradient is accumulated in place into one buffer ([`GradBuffers`]) across the micro
//! batches of an optimizer step. The head runs only at the positions whose log-probs are asked
//! for (a GRPO batch's response tokens), as TRL's `logits_to_keep` does.
//!
//! The model is the one [`crate::model::qwen2::Model`] runs (Qwen2 with q/k/v biases, Llama,
//! Qwen3 with q/k norm; tied or untied head). A batch holds no padding: its rows are grouped by
//! shared prompt ([`Batch::responses`]), the prompt's rows once and each response's rows after
//! them, every query seeing exactly the keys its own full sequence would show it under a causal
//! mask. The tests check the log-probs and every gradient against candle's autograd over the
//! model run on each whole sequence.

use crate::kernels::strided::{matmul, View};
use crate::kernels::{self, vexp};
use crate::model::{build_model, Config, Model, Weights};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{CpuStorage, Device, Storage, StorageRef, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;

/// Rows handed to one parallel task of a row kernel, for rows of `width` values.
fn task_rows(width: usize) -> usize {
    ((1 << 14) / width.max(1)).max(1)
}

/// `y (rows, out) = x (rows, in) W^T (+ bias)` for a weight `W (out, in)`.
fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, n_in: usize, n_out: usize) -> Result<Vec<f32>> {
    let mut y = vec![0f32; rows * n_out];
    matmul(&mut y, n_out, View::rows(x, rows, n_in), View::rows(w, n_out, n_in).t(), false, true)?;
    if let Some(b) = bias {
        y.par_chunks_mut(n_out).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
    }
    Ok(y)
}

/// The backward pass of [`linear`] (without its bias) for the output gradient `dy`:
/// `dw += dy^T x`, and `dx = dy W` (`dx += dy W` when `accumulate`).
fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (rows, n_in, n_out): (usize, usize, usize),
    dw: &mut [f32],
    dx: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    matmul(dw, n_in, View::rows(dy, rows, n_out).t(), View::rows(x, rows, n_in), true, true)?;
    Ok(matmul(dx, n_in, View::rows(dy, rows, n_out), View::rows(w, n_out, n_in), accumulate, true)?)
}

/// The bias's gradient: `db += sum of dy's rows`.
fn bias_backward(dy: &[f32], db: &mut [f32]) {
    for row in dy.chunks(db.len().max(1)) {
        db.iter_mut().zip(row).for_each(|(b, g)| *b += g);
    }
}

/// RMS norm of each `width`-row of `x` with `weight`: the normalised rows and each row's
/// `1 / sqrt(mean(x^2) + eps)` (the backward pass reads it).
fn rms_norm(x: &[f32], weight: &[f32], width: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = x.to_vec();
    let mut inv = vec![0f32; x.len() / width];
    let rows = task_rows(width);
    y.par_chunks_mut(rows * width).zip(inv.par_chunks_mut(rows)).for_each(|(ys, invs)| {
        for (row, inv) in ys.chunks_mut(width).zip(invs) {
            let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            *inv = 1.0 / (mean_sq + eps).sqrt();
            row.iter_mut().zip(weight).for_each(|(v, &w)| *v *= *inv * w);
        }
    });
    (y, inv)
}

/// The backward pass of [`rms_norm`] for the output gradient `dy`, in place (it becomes dx), its
/// weight's gradient added to `dw`.
fn rms_norm_backward(x: &[f32], inv: &[f32], weight: &[f32], width: usize, dy: &mut [f32], dw: &mut [f32]) {
    let partial = kernels::fused::rms_norm_backward(x, weight, width, dy, |row, _| inv[row]);
    dw.iter_mut().zip(&partial).for_each(|(d, p)| *d += p);
}

/// `a += b`.
fn add_assign(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(1 << 14).zip(b.par_chunks(1 << 14)).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Rotary tables cos, sin (t, head_dim / 2) for positions 0..t, as the model builds them.
fn rotary_tables(cfg: &Config, t: usize) -> (Vec<f32>, Vec<f32>) {
    let (hd, half) = (cfg.head_dim(), cfg.head_dim() / 2);
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32).collect();
    let freqs: Vec<f32> = (0..t).flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f)).collect();
    (freqs.iter().map(|f| f.cos()).collect(), freqs.iter().map(|f| f.sin()).collect())
}

/// Rotates every head of rows (n, heads * hd) in place by its row's position's angles (`sign`
/// 1), or back (`sign` -1: the backward pass): the halves of a head rotate as pairs (`rotate_half`).
fn rotate(x: &mut [f32], width: usize, hd: usize, positions: &[u32], (cos, sin): (&[f32], &[f32]), sign: f32) {
    let half = hd / 2;
    x.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &p)| {
        let at = p as usize * half;
        let (cos, sin) = (&cos[at..at + half], &sin[at..at + half]);
        for head in row.chunks_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, c) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - sign * c * sin[i];
                x2[i] = sign * a * sin[i] + c * cos[i];
            }
        }
    });
}

/// Head-major blocks (heads, rows, hd), one per group, back to rows (n, heads * hd).
fn heads_to_rows(x: &[f32], groups: &[Group], heads: usize, hd: usize) -> Vec<f32> {
    let width = heads * hd;
    let mut out = vec![0f32; x.len()];
    for g in groups {
        let rows = g.rows();
        let block = &x[g.start * width..(g.start + rows) * width];
        for (i, row) in out[g.start * width..(g.start + rows) * width].chunks_mut(width).enumerate() {
            for (h, head) in row.chunks_mut(hd).enumerate() {
                head.copy_from_slice(&block[(h * rows + i) * hd..(h * rows + i + 1) * hd]);
            }
        }
    }
    out
}

/// `buf` cut into consecutive pieces of the given sizes (one per parallel task).
fn split_sizes(mut buf: &mut [f32], sizes: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for size in sizes {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(size);
        out.push(head);
        buf = rest;
    }
    out
}

/// One weight: its index among the pass's variables (where its gradient goes) and its values.
#[derive(Clone, Copy)]
struct W<'a> {
    at: usize,
    v: &'a [f32],
}

struct LayerParams<'a> {
    ln1: W<'a>,
    ln2: W<'a>,
    q: W<'a>,
    k: W<'a>,
    v: W<'a>,
    q_bias: Option<W<'a>>,
    k_bias: Option<W<'a>>,
    v_bias: Option<W<'a>>,
    q_norm: Option<W<'a>>,
    k_norm: Option<W<'a>>,
    o: W<'a>,
    gate: W<'a>,
    up: W<'a>,
    down: W<'a>,
}

/// The variables' storage, read-locked for one pass (the optimizer writes them between passes).
pub struct Locked<'a> {
    names: Vec<&'a str>,
    guards: Vec<StorageRef<'a>>,
    layouts: Vec<candle_core::Layout>,
}

impl<'a> Locked<'a> {
    pub fn new(vars: &'a [(String, Var)]) -> Self {
        let (mut names, mut guards, mut layouts) = (Vec::new(), Vec::new(), Vec::new());
        for (name, var) in vars {
            let (guard, layout) = var.as_tensor().storage_and_layout();
            names.push(name.as_str());
            layouts.push(layout.clone());
            guards.push(guard);
        }
        Self { names, guards, layouts }
    }
}

/// The model's weights as f32 slices, checked against the config's shapes.
pub struct Params<'a> {
    cfg: &'a Config,
    embed: W<'a>,
    layers: Vec<LayerParams<'a>>,
    norm: W<'a>,
    head: W<'a>,
}

impl<'a> Params<'a> {
    pub fn new(cfg: &'a Config, locked: &'a Locked<'a>) -> Result<Self> {
        let mut by_name: HashMap<&str, W<'a>> = HashMap::new();
        for (at, ((name, guard), layout)) in locked.names.iter().zip(&locked.guards).zip(&locked.layouts).enumerate() {
            let Storage::Cpu(CpuStorage::F32(data)) = &**guard else { bail!("{name}: the owned pass takes f32 weights on the CPU") };
            let (start, end) = layout.contiguous_offsets().with_context(|| format!("{name}: not contiguous"))?;
            by_name.insert(name, W { at, v: &data[start..end] });
        }
        for (name, shape) in cfg.tensor_shapes() {
            let n: usize = shape.iter().product();
            let w = by_name.get(name.as_str()).with_context(|| format!("the policy has no weight {name}"))?;
            ensure!(w.v.len() == n, "{name}: {} values for shape {shape:?}", w.v.len());
        }
        let get = |name: &str| -> W<'a> { by_name[name] };
        let opt = |name: String| -> Option<W<'a>> { by_name.get(name.as_str()).copied() };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let attn = |n: &str| get(&format!("{p}.self_attn.{n}.weight"));
                let bias = |n: &str| if cfg.attention_bias() { opt(format!("{p}.self_attn.{n}.bias")) } else { None };
                let qk_norm = |n: &str| if cfg.qk_norm() { opt(format!("{p}.self_attn.{n}.weight")) } else { None };
                LayerParams {
                    ln1: get(&format!("{p}.input_layernorm.weight")),
                    ln2: get(&format!("{p}.post_attention_layernorm.weight")),
                    q: attn("q_proj"),
                    k: attn("k_proj"),
                    v: attn("v_proj"),
                    q_bias: bias("q_proj"),
                    k_bias: bias("k_proj"),
                    v_bias: bias("v_proj"),
                    q_norm: qk_norm("q_norm"),
                    k_norm: qk_norm("k_norm"),
                    o: attn("o_proj"),
                    gate: get(&format!("{p}.mlp.gate_proj.weight")),
                    up: get(&format!("{p}.mlp.up_proj.weight")),
                    down: get(&format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let head = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        Ok(Self { cfg, embed: get("model.embed_tokens.weight"), layers, norm: get("model.norm.weight"), head: get(head) })
    }
}

/// Named trainable variables, in a fixed order (the gradient buffers' and the optimizer's).
pub type Vars = Vec<(String, Var)>;

/// The weights as trainable variables, and the model candle's autograd runs over them, or no
/// model when the owned pass takes the training (f32 weights on the CPU).
pub fn trainable(cfg: &Config, weights: Weights, dev: &Device) -> Result<(Vars, Option<Model>)> {
    let vars: Vars = weights.into_iter().map(|(k, t)| Ok((k, Var::from_tensor(&t)?))).collect::<Result<_>>()?;
    if vars.first().is_some_and(|(_, v)| kernels::cpu_f32(v.as_tensor())) {
        return Ok((vars, None));
    }
    let model_weights: Weights = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let model = build_model(cfg, &model_weights, dev)?;
    Ok((vars, Some(model)))
}

/// One gradient buffer per variable (in the variables' order), accumulated over passes.
pub struct GradBuffers(pub Vec<Vec<f32>>);

impl GradBuffers {
    pub fn zeros(vars: &[(String, Var)]) -> Self {
        Self(vars.iter().map(|(_, v)| vec![0f32; v.elem_count()]).collect())
    }

    /// The buffers as CPU tensors of the variables' shapes.
    pub fn into_tensors(self, vars: &[(String, Var)]) -> Result<Vec<Option<Tensor>>> {
        ensure!(self.0.len() == vars.len(), "{} gradient buffers for {} variables", self.0.len(), vars.len());
        self.0.into_iter().zip(vars).map(|(g, (_, v))| Ok(Some(Tensor::from_vec(g, v.shape(), &Device::Cpu)?))).collect()
    }
}

/// Sequences that share a prompt: its rows once (the prefix, from position 0), then each
/// response's rows (a continuation, from the prefix's end), all consecutive from `start`. A
/// prefix's queries see the prefix causally; a continuation's see the whole prefix and its own
/// rows causally, as each full sequence would.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub start: usize,
    pub prefix: usize,
    pub continuations: Vec<usize>,
}

impl Group {
    fn rows(&self) -> usize {
        self.prefix + self.continuations.iter().sum::<usize>()
    }

    /// Attention probabilities of one head: prefix x prefix, then continuation x (prefix + own).
    fn probs_len(&self) -> usize {
        self.prefix * self.prefix + self.continuations.iter().map(|&l| l * (self.prefix + l)).sum::<usize>()
    }
}

/// A training batch: token rows with their positions, grouped by shared prompt, and the rows to
/// score: `(row, target token)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub groups: Vec<Group>,
    pub scored: Vec<(usize, u32)>,
}

impl Batch {
    /// (prompt, response) pairs, every response token scored, in the pairs' order. Pairs with
    /// the same prompt share its rows (a GRPO group's prompt is computed once, its gradient summed
    /// over the group's responses); no row is padding.
    pub fn responses(seqs: &[(&[u32], &[u32])]) -> Result<Self> {
        if let Some(i) = seqs.iter().position(|(p, z)| p.is_empty() || z.is_empty()) {
            bail!("sequence {i}: empty prompt or response");
        }
        // Each distinct prompt, in order of first appearance, with the sequences that share it.
        let mut by_prompt: Vec<(&[u32], Vec<usize>)> = Vec::new();
        for (i, &(prompt, _)) in seqs.iter().enumerate() {
            match by_prompt.iter_mut().find(|(p, _)| *p == prompt) {
                Some((_, members)) => members.push(i),
                None => by_prompt.push((prompt, vec![i])),
            }
        }
        let (mut tokens, mut positions, mut groups) = (Vec::new(), Vec::new(), Vec::new());
        // Per sequence: the row that predicts its first response token (the prompt's last) and
        // the first row of its continuation.
        let mut rows_of = vec![(0, 0); seqs.len()];
        for (prompt, members) in by_prompt {
            let start = tokens.len();
            tokens.extend_from_slice(prompt);
            positions.extend(0..prompt.len() as u32);
            let mut continuations = Vec::with_capacity(members.len());
            for i in members {
                let response = seqs[i].1;
                rows_of[i] = (start + prompt.len() - 1, tokens.len());
                tokens.extend_from_slice(&response[..response.len() - 1]);
                positions.extend(prompt.len() as u32..(prompt.len() + response.len() - 1) as u32);
                continuations.push(response.len() - 1);
            }
            groups.push(Group { start, prefix: prompt.len(), continuations });
        }
        let mut scored = Vec::with_capacity(seqs.iter().map(|(_, z)| z.len()).sum());
        for ((_, response), &(last_prompt_row, continuation)) in seqs.iter().zip(&rows_of) {
            scored.push((last_prompt_row, response[0]));
            scored.extend(response[1..].iter().enumerate().map(|(j, &z)| (continuation + j, z)));
        }
        Ok(Self { tokens, positions, groups, scored })
    }
}

/// What one layer's backward pass reads.
struct LayerTape {
    x: Vec<f32>,
    inv1: Vec<f32>,
    n1: Vec<f32>,
    /// q and k before the q/k norm, with its inverse RMS per head (Qwen3).
    q_pre: Option<(Vec<f32>, Vec<f32>)>,
    k_pre: Option<(Vec<f32>, Vec<f32>)>,
    /// Rotated q (b * t, heads * hd), k and v (b * t, kv * hd).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities (b, heads, t, t), zero above the diagonal.
    probs: Vec<f32>,
    /// Attention output (b * t, heads * hd), the o projection's input.
    o: Vec<f32>,
    x2: Vec<f32>,
    inv2: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// A forward pass's log-probs and the activations its backward pass reads.
pub struct Tape<'p> {
    params: &'p Params<'p>,
    tokens: Vec<u32>,
    positions: Vec<u32>,
    groups: Vec<Group>,
    scored: Vec<(usize, u32)>,
    rotary: (Vec<f32>, Vec<f32>),
    layers: Vec<LayerTape>,
    /// The last layer's output at the scored rows, its final-norm inverse RMS and normed rows.
    x_scored: Vec<f32>,
    inv_scored: Vec<f32>,
    h_scored: Vec<f32>,
    /// The head's logits at the scored rows (scored, vocab).
    logits: Vec<f32>,
    logp: Vec<f32>,
}

impl<'p> Tape<'p> {
    /// The forward pass: log p(target) at every scored position.
    pub fn forward(params: &'p Params<'p>, batch: Batch) -> Result<Self> {
        let cfg = params.cfg;
        let (n, d) = (batch.tokens.len(), cfg.hidden_size);
        ensure!(batch.positions.len() == n, "{} positions for {n} tokens", batch.positions.len());
        ensure!(batch.groups.iter().map(Group::rows).sum::<usize>() == n, "the groups do not cover the batch's {n} rows");
        let t = batch.positions.iter().max().map_or(0, |&p| p as usize + 1);
        ensure!(
            t <= cfg.max_position_embeddings.min(crate::model::qwen2::MAX_ROTARY_POSITIONS),
            "{t} positions exceed the model's context"
        );
        let vocab = cfg.vocab_size;
        if let Some(bad) = batch.tokens.iter().chain(batch.scored.iter().map(|(_, tok)| tok)).find(|&&tok| tok as usize >= vocab) {
            bail!("token {bad} is outside the vocabulary ({vocab} rows)");
        }
        if let Some((row, _)) = batch.scored.iter().find(|(row, _)| *row >= n) {
            bail!("scored row {row} outside the batch's {n} rows");
        }
        let mut x = vec![0f32; n * d];
        x.par_chunks_mut(d).zip(batch.tokens.par_iter()).for_each(|(row, &tok)| {
            row.copy_from_slice(&params.embed.v[tok as usize * d..(tok as usize + 1) * d]);
        });
        let rotary = rotary_tables(cfg, t);
        let mut layers = Vec::with_capacity(params.layers.len());
        for lp in &params.layers {
            let (tape, next) = layer_forward(cfg, lp, x, (&batch.positions, &batch.groups), (&rotary.0, &rotary.1))?;
            layers.push(tape);
            x = next;
        }
        let eps = cfg.rms_norm_eps as f32;
        let m = batch.scored.len();
        let mut x_scored = vec![0f32; m * d];
        x_scored.par_chunks_mut(d).zip(batch.scored.par_iter()).for_each(|(row, &(at, _))| row.copy_from_slice(&x[at * d..(at + 1) * d]));
        drop(x);
        let (h_scored, inv_scored) = rms_norm(&x_scored, params.norm.v, d, eps);
        let logits = linear(&h_scored, params.head.v, None, m, d, vocab)?;
        let logp = logits
            .par_chunks(vocab)
            .zip(batch.scored.par_iter())
            .map(|(row, &(_, tok))| row[tok as usize] - vexp::log_sum_exp(row))
            .collect();
        Ok(Self {
            params,
            tokens: batch.tokens,
            positions: batch.positions,
            groups: batch.groups,
            scored: batch.scored,
            rotary,
            layers,
            x_scored,
            inv_scored,
            h_scored,
            logits,
            logp,
        })
    }

    /// log p(target) of each scored position, in `scored` order.
    pub fn logp(&self) -> &[f32] {
        &self.logp
    }

    /// The backward pass for a loss whose gradient with respect to each scored log-prob is
    /// `dlogp`: every weight's gradient is added into `grads`.
    pub fn backward(self, dlogp: &[f32], grads: &mut GradBuffers) -> Result<()> {
        let (params, cfg) = (self.params, self.params.cfg);
        ensure!(dlogp.len() == self.scored.len(), "{} gradients for {} scored positions", dlogp.len(), self.scored.len());
        ensure!(grads.0.len() > params.head.at.max(params.embed.at), "gradient buffers for another variable list");
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let (m, n) = (self.scored.len(), self.tokens.len());
        // d logits = g (onehot(target) - softmax(logits)), in place.
        let mut dlogits = self.logits;
        dlogits.par_chunks_mut(vocab).zip(dlogp.par_iter()).zip(self.scored.par_iter()).for_each(|((row, &g), &(_, tok))| {
            vexp::softmax_in_place(row);
            row.iter_mut().for_each(|p| *p *= -g);
            row[tok as usize] += g;
        });
        let mut dh = vec![0f32; m * d];
        linear_backward(&self.h_scored, params.head.v, &dlogits, (m, d, vocab), &mut grads.0[params.head.at], &mut dh, false)?;
        drop(dlogits);
        rms_norm_backward(&self.x_scored, &self.inv_scored, params.norm.v, d, &mut dh, &mut grads.0[params.norm.at]);
        let mut dx = vec![0f32; n * d];
        for (row, &(at, _)) in dh.chunks(d).zip(&self.scored) {
            dx[at * d..(at + 1) * d].iter_mut().zip(row).for_each(|(a, g)| *a += g);
        }
        let rotary = (&self.rotary.0[..], &self.rotary.1[..]);
        for (lp, tape) in params.layers.iter().zip(self.layers).rev() {
            dx = layer_backward(cfg, lp, tape, dx, (&self.positions, &self.groups), rotary, grads)?;
        }
        let de = &mut grads.0[params.embed.at];
        for (row, &tok) in dx.chunks(d).zip(&self.tokens) {
            de[tok as usize * d..(tok as usize + 1) * d].iter_mut().zip(row).for_each(|(a, g)| *a += g);
        }
        Ok(())
    }
}

fn layer_forward(
    cfg: &Config,
    lp: &LayerParams,
    x: Vec<f32>,
    (positions, groups): (&[u32], &[Group]),
    rotary: (&[f32], &[f32]),
) -> Result<(LayerTape, Vec<f32>)> {
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let (heads, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let (qd, kvd, n, eps) = (heads * hd, kv * hd, positions.len(), cfg.rms_norm_eps as f32);
    let (n1, inv1) = rms_norm(&x, lp.ln1.v, d, eps);
    let mut q = linear(&n1, lp.q.v, lp.q_bias.map(|w| w.v), n, d, qd)?;
    let mut k = linear(&n1, lp.k.v, lp.k_bias.map(|w| w.v), n, d, kvd)?;
    let v = linear(&n1, lp.v.v, lp.v_bias.map(|w| w.v), n, d, kvd)?;
    let (mut q_pre, mut k_pre) = (None, None);
    // Qwen3's q/k norm: an RMS norm over each head.
    if let (Some(qn), Some(kn)) = (lp.q_norm, lp.k_norm) {
        let (qn_out, q_inv) = rms_norm(&q, qn.v, hd, eps);
        let (kn_out, k_inv) = rms_norm(&k, kn.v, hd, eps);
        q_pre = Some((std::mem::replace(&mut q, qn_out), q_inv));
        k_pre = Some((std::mem::replace(&mut k, kn_out), k_inv));
    }
    rotate(&mut q, qd, hd, positions, rotary, 1.0);
    rotate(&mut k, kvd, hd, positions, rotary, 1.0);
    let (probs, o) = attention_forward((&q, &k, &v), groups, heads, kv, hd)?;
    let attn = linear(&o, lp.o.v, None, n, qd, d)?;
    let mut x2 = attn;
    add_assign(&mut x2, &x);
    let (n2, inv2) = rms_norm(&x2, lp.ln2.v, d, eps);
    let gate = linear(&n2, lp.gate.v, None, n, d, f)?;
    let up = linear(&n2, lp.up.v, None, n, d, f)?;
    let mut act = gate.clone();
    act.par_chunks_mut(1 << 14).zip(up.par_chunks(1 << 14)).for_each(|(a, u)| vexp::swiglu_in_place(a, u));
    let mut out = linear(&act, lp.down.v, None, n, f, d)?;
    add_assign(&mut out, &x2);
    Ok((LayerTape { x, inv1, n1, q_pre, k_pre, q, k, v, probs, o, x2, inv2, n2, gate, up, act }, out))
}

/// The attention's parallel tasks, one per (group, kv head), in the order of their buffers.
fn attention_tasks(groups: &[Group], kv: usize) -> Vec<(&Group, usize)> {
    groups.iter().flat_map(|group| (0..kv).map(move |g| (group, g))).collect()
}

/// A group's query segments as (first row, rows, context rows): the prefix (no context), then
/// each continuation (the prefix as context). A segment's row `r` sees its context and its own
/// rows `0..=r`.
fn segments(group: &Group) -> Vec<(usize, usize, usize)> {
    let mut out = vec![(0, group.prefix, 0)];
    let mut at = group.prefix;
    for &rows in &group.continuations {
        out.push((at, rows, group.prefix));
        at += rows;
    }
    out
}

/// The views one segment's attention reads for query head `h` / kv head `g` of a group: its
/// queries, the context's and its own keys and values.
struct SegmentViews<'a> {
    q: View<'a>,
    k_ctx: View<'a>,
    k_own: View<'a>,
    v_ctx: View<'a>,
    v_own: View<'a>,
}

#[allow(clippy::too_many_arguments)]
fn segment_views<'a>(
    (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
    group: &Group,
    (first, rows, ctx): (usize, usize, usize),
    (h, g): (usize, usize),
    (qd, kvd, hd): (usize, usize, usize),
) -> SegmentViews<'a> {
    let at = |x: &'a [f32], width: usize, row: usize, col: usize| &x[(group.start + row) * width + col * hd..];
    SegmentViews {
        q: View::strided(at(q, qd, first, h), rows, hd, qd),
        k_ctx: View::strided(at(k, kvd, 0, g), ctx, hd, kvd),
        k_own: View::strided(at(k, kvd, first, g), rows, hd, kvd),
        v_ctx: View::strided(at(v, kvd, 0, g), ctx, hd, kvd),
        v_own: View::strided(at(v, kvd, first, g), rows, hd, kvd),
    }
}

/// Causal attention within each group: probabilities (per group and head, [`Group::probs_len`]
/// values) and outputs (n, heads * hd).
fn attention_forward(qkv: (&[f32], &[f32], &[f32]), groups: &[Group], heads: usize, kv: usize, hd: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let (qd, kvd, rep) = (heads * hd, kv * hd, heads / kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut probs = vec![0f32; groups.iter().map(|g| heads * g.probs_len()).sum()];
    let mut o_heads = vec![0f32; qkv.0.len()];
    let tasks = attention_tasks(groups, kv);
    let p_parts = split_sizes(&mut probs, tasks.iter().map(|(group, _)| rep * group.probs_len()));
    let o_parts = split_sizes(&mut o_heads, tasks.iter().map(|(group, _)| rep * group.rows() * hd));
    p_parts.into_par_iter().zip(o_parts).zip(tasks.par_iter()).try_for_each(|((p, o), &(group, g))| {
        let (rows, len) = (group.rows(), group.probs_len());
        for i in 0..rep {
            let h = g * rep + i;
            let (p, o) = (&mut p[i * len..(i + 1) * len], &mut o[i * rows * hd..(i + 1) * rows * hd]);
            let mut at = 0;
            for (first, m, ctx) in segments(group) {
                let width = ctx + m;
                let block = &mut p[at..at + m * width];
                at += m * width;
                if m == 0 {
                    continue;
                }
                let sv = segment_views(qkv, group, (first, m, ctx), (h, g), (qd, kvd, hd));
                matmul(block, width, sv.q, sv.k_ctx.t(), false, false)?;
                matmul(&mut block[ctx..], width, sv.q, sv.k_own.t(), false, false)?;
                for (r, row) in block.chunks_mut(width).enumerate() {
                    let (seen, future) = row.split_at_mut(ctx + r + 1);
                    seen.iter_mut().for_each(|s| *s *= scale);
                    vexp::softmax_in_place(seen);
                    future.fill(0.0);
                }
                let out = &mut o[first * hd..(first + m) * hd];
                matmul(out, hd, View::strided(block, m, ctx, width), sv.v_ctx, false, false)?;
                matmul(out, hd, View::strided(&block[ctx..], m, m, width), sv.v_own, true, false)?;
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok((probs, heads_to_rows(&o_heads, groups, heads, hd)))
}

/// The backward pass of the attention for the output gradient `d_o` (n, heads * hd): the
/// gradients of the rotated q, k and v in their row layouts.
fn attention_backward(
    qkv: (&[f32], &[f32], &[f32]),
    probs: &[f32],
    d_o: &[f32],
    groups: &[Group],
    (heads, kv, hd): (usize, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (qd, kvd, rep) = (heads * hd, kv * hd, heads / kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0f32; qkv.0.len()], vec![0f32; qkv.1.len()], vec![0f32; qkv.2.len()]);
    let tasks = attention_tasks(groups, kv);
    let mut p_parts = Vec::with_capacity(tasks.len());
    let mut rest = probs;
    for (group, _) in &tasks {
        let (part, tail) = rest.split_at(rep * group.probs_len());
        p_parts.push(part);
        rest = tail;
    }
    let dq_parts = split_sizes(&mut dq, tasks.iter().map(|(group, _)| rep * group.rows() * hd));
    let dk_parts = split_sizes(&mut dk, tasks.iter().map(|(group, _)| group.rows() * hd));
    let dv_parts = split_sizes(&mut dv, tasks.iter().map(|(group, _)| group.rows() * hd));
    dq_parts.into_par_iter().zip(dk_parts).zip(dv_parts).zip(p_parts).zip(tasks.par_iter()).try_for_each(
        |((((dq, dk), dv), p), &(group, g))| {
            let (rows, len) = (group.rows(), group.probs_len());
            for i in 0..rep {
                let h = g * rep + i;
                let (p, dq) = (&p[i * len..(i + 1) * len], &mut dq[i * rows * hd..(i + 1) * rows * hd]);
                let mut at = 0;
                for (first, m, ctx) in segments(group) {
                    let width = ctx + m;
                    let block = &p[at..at + m * width];
                    at += m * width;
                    if m == 0 {
                        continue;
                    }
                    let sv = segment_views(qkv, group, (first, m, ctx), (h, g), (qd, kvd, hd));
                    let d_out = View::strided(&d_o[(group.start + first) * qd + h * hd..], m, hd, qd);
                    let (p_ctx, p_own) = (View::strided(block, m, ctx, width), View::strided(&block[ctx..], m, m, width));
                    // dV += P^T dO; dP = dO V^T; dS = scale P (dP - sum(dP P)); dQ = dS K; dK += dS^T Q.
                    matmul(&mut dv[..ctx * hd], hd, p_ctx.t(), d_out, true, false)?;
                    matmul(&mut dv[first * hd..(first + m) * hd], hd, p_own.t(), d_out, true, false)?;
                    let mut ds = vec![0f32; m * width];
                    matmul(&mut ds, width, d_out, sv.v_ctx.t(), false, false)?;
                    matmul(&mut ds[ctx..], width, d_out, sv.v_own.t(), false, false)?;
                    for (r, (ds, p)) in ds.chunks_mut(width).zip(block.chunks(width)).enumerate() {
                        let seen = ctx + r + 1;
                        let dot: f32 = ds[..seen].iter().zip(&p[..seen]).map(|(a, b)| a * b).sum();
                        ds[..seen].iter_mut().zip(&p[..seen]).for_each(|(g, &p)| *g = scale * p * (*g - dot));
                        ds[seen..].fill(0.0);
                    }
                    let (ds_ctx, ds_own) = (View::strided(&ds, m, ctx, width), View::strided(&ds[ctx..], m, m, width));
                    let dq_segment = &mut dq[first * hd..(first + m) * hd];
                    matmul(dq_segment, hd, ds_ctx, sv.k_ctx, false, false)?;
                    matmul(dq_segment, hd, ds_own, sv.k_own, true, false)?;
                    matmul(&mut dk[..ctx * hd], hd, ds_ctx.t(), sv.q, true, false)?;
                    matmul(&mut dk[first * hd..(first + m) * hd], hd, ds_own.t(), sv.q, true, false)?;
                }
            }
            Ok::<_, anyhow::Error>(())
        },
    )?;
    Ok((heads_to_rows(&dq, groups, heads, hd), heads_to_rows(&dk, groups, kv, hd), heads_to_rows(&dv, groups, kv, hd)))
}

/// The backward pass of one layer for the gradient `dx` of its output: returns the gradient of
/// its input, adds the weights' gradients into `grads`.
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    cfg: &Config,
    lp: &LayerParams,
    tape: LayerTape,
    dx: Vec<f32>,
    (positions, groups): (&[u32], &[Group]),
    rotary: (&[f32], &[f32]),
    grads: &mut GradBuffers,
) -> Result<Vec<f32>> {
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let (heads, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let (qd, kvd, n) = (heads * hd, kv * hd, positions.len());
    let g = &mut grads.0;
    // MLP: out = x2 + down(silu(gate) * up).
    let mut d_act = vec![0f32; n * f];
    linear_backward(&tape.act, lp.down.v, &dx, (n, f, d), &mut g[lp.down.at], &mut d_act, false)?;
    drop(tape.act);
    // d gate = g up s (1 + gate (1 - s)), d up = g silu(gate), s = sigmoid(gate): in place.
    let (mut d_gate, mut d_up) = (tape.gate, tape.up);
    d_gate.par_chunks_mut(1 << 14).zip(d_up.par_chunks_mut(1 << 14)).zip(d_act.par_chunks(1 << 14)).for_each(|((a, u), g)| {
        for ((a, u), &g) in a.iter_mut().zip(u.iter_mut()).zip(g) {
            let s = 1.0 / (1.0 + (-*a).exp());
            (*a, *u) = (g * *u * s * (1.0 + *a * (1.0 - s)), g * *a * s);
        }
    });
    drop(d_act);
    let mut dn2 = vec![0f32; n * d];
    linear_backward(&tape.n2, lp.gate.v, &d_gate, (n, d, f), &mut g[lp.gate.at], &mut dn2, false)?;
    linear_backward(&tape.n2, lp.up.v, &d_up, (n, d, f), &mut g[lp.up.at], &mut dn2, true)?;
    drop((d_gate, d_up));
    rms_norm_backward(&tape.x2, &tape.inv2, lp.ln2.v, d, &mut dn2, &mut g[lp.ln2.at]);
    let mut dx2 = dx;
    add_assign(&mut dx2, &dn2);
    drop(dn2);
    // Attention: x2 = x + o_proj(attention(q, k, v)).
    let mut d_o = vec![0f32; n * qd];
    linear_backward(&tape.o, lp.o.v, &dx2, (n, qd, d), &mut g[lp.o.at], &mut d_o, false)?;
    let (mut dq, mut dk, dv) = attention_backward((&tape.q, &tape.k, &tape.v), &tape.probs, &d_o, groups, (heads, kv, hd))?;
    drop(d_o);
    rotate(&mut dq, qd, hd, positions, rotary, -1.0);
    rotate(&mut dk, kvd, hd, positions, rotary, -1.0);
    if let (Some((q_pre, q_inv)), Some(qn)) = (&tape.q_pre, lp.q_norm) {
        rms_norm_backward(q_pre, q_inv, qn.v, hd, &mut dq, &mut g[qn.at]);
    }
    if let (Some((k_pre, k_inv)), Some(kn)) = (&tape.k_pre, lp.k_norm) {
        rms_norm_backward(k_pre, k_inv, kn.v, hd, &mut dk, &mut g[kn.at]);
    }
    let mut dn1 = vec![0f32; n * d];
    for (i, (w, bias, dy, width)) in
        [(lp.q, lp.q_bias, &dq, qd), (lp.k, lp.k_bias, &dk, kvd), (lp.v, lp.v_bias, &dv, kvd)].into_iter().enumerate()
    {
        linear_backward(&tape.n1, w.v, dy, (n, d, width), &mut g[w.at], &mut dn1, i > 0)?;
        if let Some(bias) = bias {
            bias_backward(dy, &mut g[bias.at]);
        }
    }
    rms_norm_backward(&tape.x, &tape.inv1, lp.ln1.v, d, &mut dn1, &mut g[lp.ln1.at]);
    add_assign(&mut dx2, &dn1);
    Ok(dx2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build_model, init_weights, test_config, TeacherForced, Weights};

    /// The three families the model runs: Qwen2 (q/k/v biases, tied head), Llama (untied head),
    /// Qwen3 (q/k norm, a head width that is not hidden / heads).
    fn families() -> Vec<Config> {
        let qwen2 = test_config(32, 48, 2, 4, 2);
        let mut llama = test_config(32, 40, 2, 4, 1);
        (llama.model_type, llama.tie_word_embeddings) = ("llama".into(), false);
        let mut qwen3 = test_config(32, 48, 2, 4, 2);
        (qwen3.model_type, qwen3.head_dim) = ("qwen3".into(), Some(16));
        vec![qwen2, llama, qwen3]
    }

    /// Log-probs and every weight's gradient (of a weighted sum of the log-probs) from the owned
    /// pass and from candle's autograd over the model.
    #[test]
    fn logprobs_and_every_gradient_match_autograd() {
        let dev = Device::Cpu;
        // Two groups sharing a prompt (one of its responses a single token: no continuation rows),
        // and prompts of their own.
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = vec![
            (vec![5, 17, 3], vec![250, 8, 9, 41, 2]),
            (vec![7], vec![30, 31]),
            (vec![5, 17, 3], vec![11, 8]),
            (vec![1, 2, 3, 4, 5, 6], vec![99, 12, 13]),
            (vec![5, 17, 3], vec![60]),
            (vec![7], vec![31, 30, 29, 28]),
        ];
        let pairs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, z)| (p.as_slice(), z.as_slice())).collect();
        for cfg in families() {
            let vars: Vec<(String, Var)> =
                init_weights(&cfg, 7, &dev).unwrap().into_iter().map(|(k, t)| (k, Var::from_tensor(&t).unwrap())).collect();
            let batch = Batch::responses(&pairs).unwrap();
            // Where teacher forcing over each whole sequence puts the same log-probs.
            let forced = TeacherForced::new(&pairs, 0, &dev).unwrap();
            let t = forced.inputs.dim(1).unwrap();
            let scored: Vec<u32> = pairs
                .iter()
                .zip(&forced.offsets)
                .enumerate()
                .flat_map(|(r, ((_, z), &offset))| (0..z.len()).map(move |j| (r * t + offset + j) as u32))
                .collect();
            assert_eq!(scored.len(), batch.scored.len());
            let dlogp: Vec<f32> = (0..scored.len()).map(|i| (i as f32 * 0.77).sin()).collect();
            let mut grads = GradBuffers::zeros(&vars);
            let locked = Locked::new(&vars);
            let params = Params::new(&cfg, &locked).unwrap();
            let tape = Tape::forward(&params, batch).unwrap();
            let logp = tape.logp().to_vec();
            tape.backward(&dlogp, &mut grads).unwrap();
            drop(params);
            drop(locked);

            let weights: Weights = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
            let model = build_model(&cfg, &weights, &dev).unwrap();
            let all = forced.logprobs(&model).unwrap().flatten_all().unwrap();
            let picked = all.index_select(&Tensor::new(scored.as_slice(), &dev).unwrap(), 0).unwrap();
            let expected: Vec<f32> = picked.to_vec1().unwrap();
            for (a, b) in logp.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "{}: log-prob {a} vs autograd's {b}", cfg.model_type);
            }
            let loss = (picked * Tensor::new(dlogp.as_slice(), &dev).unwrap()).unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            for ((name, var), ours) in vars.iter().zip(&grads.0) {
                let theirs: Vec<f32> = store.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(scale > 0.0, "{}: {name} has no gradient", cfg.model_type);
                assert!(diff <= 1e-4 * scale, "{}: {name}: gradients differ by {diff} (largest {scale})", cfg.model_type);
            }
        }
    }

    #[test]
    fn sequences_with_one_prompt_share_its_rows() {
        let batch = Batch::responses(&[(&[1, 2][..], &[3, 4][..]), (&[5][..], &[6][..]), (&[1, 2][..], &[7, 8, 9][..])]).unwrap();
        // [1, 2] once, then 3 (predicting 4), then 7, 8 (predicting 8, 9); then [5] alone.
        assert_eq!(batch.tokens, [1, 2, 3, 7, 8, 5]);
        assert_eq!(batch.positions, [0, 1, 2, 2, 3, 0]);
        assert_eq!(
            batch.groups,
            [Group { start: 0, prefix: 2, continuations: vec![1, 2] }, Group { start: 5, prefix: 1, continuations: vec![0] }]
        );
        // In the pairs' order: 3 and 7 both predicted at the prompt's last row (1).
        assert_eq!(batch.scored, [(1, 3), (2, 4), (5, 6), (1, 7), (3, 8), (4, 9)]);
        assert!(Batch::responses(&[(&[1][..], &[][..])]).is_err());
    }
}
