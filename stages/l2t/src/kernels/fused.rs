//! Fused kernels over f32 CPU tensors, each one pass over its rows instead of candle's chain of
//! elementwise ops (each with its own buffer, and as many again in the backward pass): attention's
//! scaled and masked softmax, silu(gate) * up, RMS norm, rotary embedding and the token log-prob
//! of a target under a row of logits. Each carries its hand-written backward pass, so training
//! takes the same kernels; the unit tests check values and gradients against the composed ops.
//! Other dtypes and devices fall back to the composed ops (the callers', under [`super::cpu_f32`]).

use super::vexp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Values handed to one parallel task at least (small rows are not worth a task each).
const MIN_TASK_VALUES: usize = 1 << 14;

/// softmax(x * scale + mask) over the last dimension for attention scores x (b, heads, t, total)
/// under an additive mask (b, 1, t, total) shared by the heads (no gradient flows to the mask).
pub fn masked_softmax(x: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, total) = x.dims4()?;
    if mask.dims() != [b, 1, t, total] {
        candle_core::bail!("masked softmax: mask {:?} for scores {:?}", mask.dims(), x.dims());
    }
    x.contiguous()?.apply_op1(MaskedSoftmax { mask: values(mask)?, scale: scale as f32, heads, t, total })
}

/// silu(gate) * up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// x / sqrt(mean(x^2) + eps) * weight over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Rotary embedding of x (b, heads, t, d) with per-row tables cos, sin (b, t, d / 2): the first
/// and second halves of each head are rotated as pairs (`rotate_half`, as in transformers).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    if cos.dims() != [b, t, d / 2] || sin.dims() != [b, t, d / 2] {
        candle_core::bail!("rope: tables {:?} / {:?} do not match x {:?}", cos.dims(), sin.dims(), x.dims());
    }
    let table = |x: &Tensor| -> Result<Vec<f32>> { x.flatten_all()?.to_vec1() };
    x.contiguous()?.apply_op1(Rope { cos: table(cos)?, sin: table(sin)?, t, d })
}

/// log softmax(logits)[target] over the last dimension: (.., vocab), (..) u32 -> (..).
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets: Vec<u32> = targets.flatten_all()?.to_vec1()?;
    let vocab = logits.dim(D::Minus1)?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target token {bad} is outside the vocabulary ({vocab} rows)");
    }
    logits.contiguous()?.apply_op1(TargetLogprob { targets })
}

/// The values of a contiguous f32 CPU buffer (the custom ops' inputs).
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 input expected") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: contiguous input expected") };
    Ok(&data[start..end])
}

/// [`contiguous_f32`] of a tensor's storage, which must be on the CPU.
fn contiguous_f32_of<'a>(storage: &'a candle_core::Storage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => contiguous_f32(cpu, layout, op),
        _ => candle_core::bail!("{op}: a CPU tensor expected"),
    }
}

/// [`contiguous_f32`], writable (the in-place ops' destination).
pub(crate) fn contiguous_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 input expected") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: contiguous input expected") };
    Ok(&mut data[start..end])
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

fn like(values: Vec<f32>, t: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, t.shape(), t.device())
}

/// Rows of `width` values per parallel task.
fn task_rows(width: usize) -> usize {
    (MIN_TASK_VALUES / width.max(1)).max(1)
}

/// The gradient of softmax(scale * x) given its output y and the output's gradient g:
/// scale * y * (g - sum(g * y)) per row.
fn softmax_backward(y: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    let width = y.dim(D::Minus1)?.max(1);
    let (yv, mut gv) = (values(y)?, values(g)?);
    gv.par_chunks_mut(task_rows(width) * width).zip(yv.par_chunks(task_rows(width) * width)).for_each(|(gs, ys)| {
        for (g, y) in gs.chunks_mut(width).zip(ys.chunks(width)) {
            let dot: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum();
            g.iter_mut().zip(y).for_each(|(g, &y)| *g = scale * y * (*g - dot));
        }
    });
    like(gv, y)
}

struct MaskedSoftmax {
    /// (b, t, total) additive mask.
    mask: Vec<f32>,
    scale: f32,
    heads: usize,
    t: usize,
    total: usize,
}

impl MaskedSoftmax {
    /// The mask row of score row `r` (rows ordered batch, head, query).
    fn mask_row(&self, r: usize) -> &[f32] {
        let (batch, query) = (r / (self.heads * self.t), r % self.t);
        let at = (batch * self.t + query) * self.total;
        &self.mask[at..at + self.total]
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.total.max(1);
        let mut y = contiguous_f32(storage, layout, self.name())?.to_vec();
        let rows = task_rows(width);
        y.par_chunks_mut(rows * width).enumerate().for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_mut(width).enumerate() {
                row.iter_mut().zip(self.mask_row(task * rows + i)).for_each(|(v, &m)| *v = *v * self.scale + m);
                vexp::softmax_in_place(row);
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        softmax_backward(y, g, self.scale).map(Some)
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gate: &CpuStorage, gate_layout: &Layout, up: &CpuStorage, up_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gate_layout.shape(), up_layout.shape());
        }
        let mut y = contiguous_f32(gate, gate_layout, self.name())?.to_vec();
        let up = contiguous_f32(up, up_layout, self.name())?;
        y.par_chunks_mut(MIN_TASK_VALUES).zip(up.par_chunks(MIN_TASK_VALUES)).for_each(|(g, u)| vexp::swiglu_in_place(g, u));
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    /// d gate = g * up * s * (1 + gate * (1 - s)), d up = g * gate * s, with s = sigmoid(gate).
    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (mut a, mut u, gv) = (values(gate)?, values(up)?, values(g)?);
        a.par_chunks_mut(MIN_TASK_VALUES).zip(u.par_chunks_mut(MIN_TASK_VALUES)).zip(gv.par_chunks(MIN_TASK_VALUES)).for_each(
            |((a, u), g)| {
                for ((a, u), &g) in a.iter_mut().zip(u.iter_mut()).zip(g) {
                    let s = 1.0 / (1.0 + (-*a).exp());
                    let (d_gate, d_up) = (g * *u * s * (1.0 + *a * (1.0 - s)), g * *a * s);
                    (*a, *u) = (d_gate, d_up);
                }
            },
        );
        Ok((Some(like(a, gate)?), Some(like(u, up)?)))
    }
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    /// 1 / sqrt(mean(x^2) + eps) of one row.
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len().max(1) as f32;
        1.0 / (mean_sq + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout, w: &CpuStorage, w_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = x_layout.shape().dim(D::Minus1)?;
        let w = contiguous_f32(w, w_layout, self.name())?;
        if w.len() != width {
            candle_core::bail!("rms-norm: weight of {} values for rows of {width}", w.len());
        }
        let mut y = contiguous_f32(x, x_layout, self.name())?.to_vec();
        y.par_chunks_mut(task_rows(width) * width).for_each(|rows| {
            for row in rows.chunks_mut(width) {
                let r = self.inv_rms(row);
                row.iter_mut().zip(w).for_each(|(v, &w)| *v *= r * w);
            }
        });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    /// dx = r * g * w - x * r^3 * sum(g * w * x) / n, dw = sum over rows of g * x * r.
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let width = w.dim(0)?;
        let (xv, wv, mut gv) = (values(x)?, values(w)?, values(g)?);
        let dw = rms_norm_backward(&xv, &wv, width, &mut gv, |_, x| self.inv_rms(x));
        Ok((Some(like(gv, x)?), Some(like(dw, w)?)))
    }
}

/// The backward pass of RMS normalisation for the output gradient `dy` over rows of `width`, in
/// place (it becomes dx): `dx = r g w - x r^3 sum(g w x) / n`; returns the weight's gradient, the
/// sum over rows of `g x r`, where `inv_rms(i, x_i)` is row i's `r`. The tasks' partial sums are
/// added in row order, so the bits do not depend on how the pool split the rows.
pub(crate) fn rms_norm_backward(
    x: &[f32],
    weight: &[f32],
    width: usize,
    dy: &mut [f32],
    inv_rms: impl Fn(usize, &[f32]) -> f32 + Sync,
) -> Vec<f32> {
    let rows = task_rows(width);
    let partials: Vec<Vec<f32>> = dy
        .par_chunks_mut(rows * width)
        .zip(x.par_chunks(rows * width))
        .enumerate()
        .map(|(task, (gs, xs))| {
            let mut dw = vec![0f32; width];
            for (i, (g, x)) in gs.chunks_mut(width).zip(xs.chunks(width)).enumerate() {
                let r = inv_rms(task * rows + i, x);
                let dot: f32 = g.iter().zip(weight).zip(x).map(|((g, w), x)| g * w * x).sum();
                let k = r * r * r * dot / width as f32;
                for (((g, &w), &x), dw) in g.iter_mut().zip(weight).zip(x).zip(dw.iter_mut()) {
                    *dw += *g * x * r;
                    *g = r * *g * w - x * k;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; width];
    for partial in &partials {
        dw.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
    }
    dw
}

struct Rope {
    /// (b, t, d / 2) tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
    d: usize,
}

impl Rope {
    /// y1 = x1 cos - sign * x2 sin, y2 = sign * x1 sin + x2 cos per head position; the backward
    /// pass is the same rotation with sign -1.
    fn rotate(&self, x: &mut [f32], heads: usize, sign: f32) {
        let (t, d, half) = (self.t, self.d, self.d / 2);
        x.par_chunks_mut(t * d).with_min_len(task_rows(t * d)).enumerate().for_each(|(bh, head)| {
            let b = bh / heads;
            for (p, v) in head.chunks_mut(d).enumerate() {
                let at = (b * t + p) * half;
                let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
                rotate_pairs(v, cos, sin, sign);
            }
        });
    }
}

/// Rotates the pairs (x1[i], x2[i]) of one head's halves by the angle whose cosines and sines
/// are given (`sign` -1 rotates back): y1 = x1 cos - sign * x2 sin, y2 = sign * x1 sin + x2 cos.
fn rotate_pairs(head: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let (x1, x2) = head.split_at_mut(head.len() / 2);
    for i in 0..x1.len() {
        let (a, c) = (x1[i], x2[i]);
        x1[i] = a * cos[i] - sign * c * sin[i];
        x2[i] = sign * a * sin[i] + c * cos[i];
    }
}

/// A stacked projection's output `qkv` (b, t, heads + 2 kv, d) split into queries (b, heads, t, d)
/// and keys and values (b, kv, t, d), the queries and keys rotated as [`rope`] rotates them (the
/// same bits) while they are copied out: one pass over the rows instead of a copy per part and a
/// rotation of its own per rotated part. `cos`, `sin`: the tables (positions, d / 2), indexed by
/// `positions` (b, t). Gradient-free.
pub fn split_heads_rotated(
    qkv: &Tensor,
    (heads, kv): (usize, usize),
    positions: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, parts, d) = qkv.dims4()?;
    let (n_pos, half) = cos.dims2()?;
    if parts != heads + 2 * kv || sin.dims() != [n_pos, half] || 2 * half != d || positions.dims() != [b, t] {
        candle_core::bail!(
            "split-heads-rotated: {:?} for {heads} + 2 x {kv} heads, tables {:?} / {:?}, positions {:?}",
            qkv.dims(),
            cos.dims(),
            sin.dims(),
            positions.dims()
        );
    }
    let positions: Vec<u32> = positions.flatten_all()?.to_vec1()?;
    if let Some(p) = positions.iter().find(|&&p| p as usize >= n_pos) {
        candle_core::bail!("split-heads-rotated: position {p} past the rotary tables' {n_pos}");
    }
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (y_guard, y_layout) = qkv.storage_and_layout();
    let (c_guard, c_layout) = cos.storage_and_layout();
    let (s_guard, s_layout) = sin.storage_and_layout();
    let (y, cos, sin) = (
        contiguous_f32_of(&y_guard, y_layout, "split-heads-rotated")?,
        contiguous_f32_of(&c_guard, c_layout, "split-heads-rotated")?,
        contiguous_f32_of(&s_guard, s_layout, "split-heads-rotated")?,
    );
    let mut outs = [heads, kv, kv].map(|n| vec![0f32; b * n * t * d]);
    let [q, k, v] = &mut outs;
    // Task: one (sequence, head) of one part, its t rows; `first`: the part's first head in qkv.
    fn tasks(
        out: &mut [f32],
        len: usize,
        n: usize,
        first: usize,
        rotate: bool,
    ) -> impl IndexedParallelIterator<Item = (&mut [f32], usize, usize, bool)> {
        out.par_chunks_mut(len.max(1)).enumerate().map(move |(bh, rows)| (rows, bh / n.max(1), first + bh % n.max(1), rotate))
    }
    let len = t * d;
    tasks(q, len, heads, 0, true)
        .chain(tasks(k, len, kv, heads, true))
        .chain(tasks(v, len, kv, heads + kv, false))
        .with_min_len(task_rows(len))
        .for_each(|(rows, seq, head, rotate)| {
            for (p, row) in rows.chunks_mut(d).enumerate() {
                let at = ((seq * t + p) * parts + head) * d;
                row.copy_from_slice(&y[at..at + d]);
                if rotate {
                    let at = positions[seq * t + p] as usize * half;
                    rotate_pairs(row, &cos[at..at + half], &sin[at..at + half], 1.0);
                }
            }
        });
    drop((y_guard, c_guard, s_guard));
    let dev = qkv.device();
    let [q, k, v] = outs;
    Ok((Tensor::from_vec(q, (b, heads, t, d), dev)?, Tensor::from_vec(k, (b, kv, t, d), dev)?, Tensor::from_vec(v, (b, kv, t, d), dev)?))
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, heads, _, _) = layout.shape().dims4()?;
        let mut y = contiguous_f32(storage, layout, self.name())?.to_vec();
        self.rotate(&mut y, heads, 1.0);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (_, heads, _, _) = x.dims4()?;
        let mut gv = values(g)?;
        self.rotate(&mut gv, heads, -1.0);
        Ok(Some(like(gv, x)?))
    }
}

struct TargetLogprob {
    targets: Vec<u32>,
}

impl CustomOp1 for TargetLogprob {
    fn name(&self) -> &'static str {
        "target-logprob"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(storage, layout, self.name())?;
        let dims = layout.dims();
        let vocab = *dims.last().unwrap_or(&1);
        if logits.len() != self.targets.len() * vocab {
            candle_core::bail!("target-logprob: {} targets for logits {dims:?}", self.targets.len());
        }
        let y: Vec<f32> =
            logits.par_chunks(vocab).zip(self.targets.par_iter()).map(|(row, &t)| row[t as usize] - vexp::log_sum_exp(row)).collect();
        Ok((CpuStorage::F32(y), Shape::from(&dims[..dims.len() - 1])))
    }

    /// d logits = g * (onehot(target) - softmax(logits)) per row.
    fn bwd(&self, logits: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let vocab = logits.dim(D::Minus1)?;
        let (mut grad, gv) = (values(logits)?, values(g)?);
        grad.par_chunks_mut(vocab).zip(gv.par_iter()).zip(self.targets.par_iter()).for_each(|((row, &g), &t)| {
            vexp::softmax_in_place(row);
            row.iter_mut().for_each(|p| *p *= -g);
            row[t as usize] += g;
        });
        Ok(Some(like(grad, logits)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Values and gradients (of a random linear function of the output) of a fused op and its
    /// composed twin agree.
    fn check(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, composed: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert!(max_diff(&a, &b) < tol, "values differ by {}", max_diff(&a, &b));
        let probe = Tensor::randn(0f32, 1.0, a.shape(), a.device()).unwrap();
        let (ga, gb) =
            ((&a * &probe).unwrap().sum_all().unwrap().backward().unwrap(), (&b * &probe).unwrap().sum_all().unwrap().backward().unwrap());
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            assert!(max_diff(x, y) < tol * 10.0, "gradient of input {i} differs by {}", max_diff(x, y));
        }
    }

    #[test]
    fn fused_ops_match_composed_values_and_gradients() {
        let dev = Device::Cpu;
        let randn = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).unwrap();
        // Row 1's first three key slots are masked (left padding), as the model's masks do.
        let mask: Vec<f32> = (0..2 * 5 * 7).map(|i| if i / 35 == 1 && i % 7 < 3 { -1e9 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, 1, 5, 7), &dev).unwrap();
        check(
            &[randn(&[2, 3, 5, 7], 3.0)],
            |t| masked_softmax(&t[0], &mask, 0.125).unwrap(),
            |t| candle_nn::ops::softmax(&(&t[0] * 0.125).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap(),
            1e-6,
        );
        check(
            &[randn(&[2, 70, 300], 2.0), randn(&[2, 70, 300], 1.0)],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            1e-5,
        );
        check(
            &[randn(&[2, 50, 96], 1.5), randn(&[96], 1.0)],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| {
                let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&t[1]).unwrap()
            },
            1e-5,
        );
        let (cos, sin) = (randn(&[2, 5, 4], 1.0), randn(&[2, 5, 4], 1.0));
        check(
            &[randn(&[2, 3, 5, 8], 1.0)],
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| {
                let full = |c: &Tensor| Tensor::cat(&[c, c], D::Minus1).unwrap().unsqueeze(1).unwrap();
                let (x1, x2) = (t[0].narrow(D::Minus1, 0, 4).unwrap(), t[0].narrow(D::Minus1, 4, 4).unwrap());
                let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (t[0].broadcast_mul(&full(&cos)).unwrap() + rotated.broadcast_mul(&full(&sin)).unwrap()).unwrap()
            },
            1e-5,
        );
        let targets = Tensor::from_vec((0..42u32).map(|i| (i * 37) % 500).collect::<Vec<_>>(), (6, 7), &dev).unwrap();
        check(
            &[randn(&[6, 7, 500], 4.0)],
            |t| target_logprobs(&t[0], &targets).unwrap(),
            |t| {
                candle_nn::ops::log_softmax(&t[0], D::Minus1)
                    .unwrap()
                    .gather(&targets.unsqueeze(2).unwrap(), 2)
                    .unwrap()
                    .squeeze(2)
                    .unwrap()
            },
            1e-5,
        );
    }

    /// The weight's gradient of the RMS norm's backward pass has the same bits however many
    /// threads split the rows (a reduction in the pool's order would not).
    #[test]
    fn rms_norm_weight_gradient_bits_do_not_depend_on_the_threads() {
        let width = 96;
        let rows = 40 * task_rows(width) + 3;
        let wave = |i: usize, f: f32| (i as f32 * f).sin();
        let x: Vec<f32> = (0..rows * width).map(|i| wave(i, 0.37) * 3.0).collect();
        let weight: Vec<f32> = (0..width).map(|i| 1.0 + wave(i, 1.3)).collect();
        let dy: Vec<f32> = (0..rows * width).map(|i| wave(i, 0.11)).collect();
        let inv: Vec<f32> = x.chunks(width).map(|r| 1.0 / (r.iter().map(|v| v * v).sum::<f32>() / width as f32 + 1e-5).sqrt()).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut dx = dy.clone();
            let dw = pool.install(|| rms_norm_backward(&x, &weight, width, &mut dx, |row, _| inv[row]));
            (dx, dw)
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let (dx1, dw1) = run(1);
        for threads in [2, 3, 8] {
            let (dx, dw) = run(threads);
            assert_eq!(bits(&dx), bits(&dx1), "dx with {threads} threads");
            assert_eq!(bits(&dw), bits(&dw1), "dw with {threads} threads");
        }
        // And the sum is the gradient: sum over rows of g x r, to f32 rounding.
        for j in [0, 17, width - 1] {
            let want: f64 = (0..rows).map(|r| f64::from(dy[r * width + j] * x[r * width + j] * inv[r])).sum();
            assert!((f64::from(dw1[j]) - want).abs() < 1e-4 * want.abs().max(1.0), "dw[{j}] = {} != {want}", dw1[j]);
        }
    }

    /// The one-pass split and rotation gives the bits of the split by views and [`rope`] over
    /// tables gathered at the positions; a position past the tables is an error.
    #[test]
    fn split_heads_rotated_is_the_split_then_rope() {
        let dev = Device::Cpu;
        let (b, t, heads, kv, d, n_pos) = (2, 7, 4, 2, 8, 20);
        let qkv = Tensor::randn(0f32, 1.0, (b, t, heads + 2 * kv, d), &dev).unwrap();
        let (cos, sin) = (Tensor::randn(0f32, 1.0, (n_pos, d / 2), &dev).unwrap(), Tensor::randn(0f32, 1.0, (n_pos, d / 2), &dev).unwrap());
        let pos: Vec<u32> = (0..b * t).map(|i| ((i * 7) % n_pos) as u32).collect();
        let positions = Tensor::from_vec(pos.clone(), (b, t), &dev).unwrap();
        let (q, k, v) = split_heads_rotated(&qkv, (heads, kv), &positions, &cos, &sin).unwrap();
        let part = |from: usize, n: usize| qkv.narrow(2, from, n).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let flat = Tensor::from_vec(pos, b * t, &dev).unwrap();
        let table = |x: &Tensor| x.index_select(&flat, 0).unwrap().reshape((b, t, d / 2)).unwrap();
        let bits = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&q), bits(&rope(&part(0, heads), &table(&cos), &table(&sin)).unwrap()));
        assert_eq!(bits(&k), bits(&rope(&part(heads, kv), &table(&cos), &table(&sin)).unwrap()));
        assert_eq!(bits(&v), bits(&part(heads + kv, kv)));
        assert_eq!(q.dims(), [b, heads, t, d]);
        let far = Tensor::from_vec(vec![n_pos as u32; b * t], (b, t), &dev).unwrap();
        assert!(split_heads_rotated(&qkv, (heads, kv), &far, &cos, &sin).is_err());
    }
}
