//! Attention without a gradient (sampling, scoring, `J`'s passes) over f32 CPU tensors.
//!
//! candle's path is a chain of batched ops (the scores' product, the masked softmax, the product
//! with the values, the copy back to rows), each its own parallel region over every head, with
//! the cores waiting at each op's end and the small products of a decode step left on one core.
//! Here one parallel task per block of a sequence's queries does all of it on its own core, head
//! by head: the scores, their softmax in place, and their product with the values, written
//! straight into the block's output rows; the keys and values are read where they lie (a
//! cache's buffers, no copy), and only up to the last key the block's queries see.

use super::strided::{matmul, View};
use super::vexp;
use candle_core::{bail, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// softmax(q k^T * scale + mask) v for queries q (b, heads, t, hd) and keys and values
/// k, v (b, kv, total, hd), under an additive mask (b, 1, t, total) shared by the heads: the
/// output (b, t, heads * hd) in the rows the output projection reads. Query heads
/// `g * rep .. (g + 1) * rep` share kv head `g` (`rep = heads / kv`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, hd) = q.dims4()?;
    let (_, kv, total, _) = k.dims4()?;
    if k.dims() != [b, kv, total, hd] || v.dims() != k.dims() || kv == 0 || !heads.is_multiple_of(kv) {
        bail!("attention: queries {:?} against keys {:?} and values {:?}", q.dims(), k.dims(), v.dims());
    }
    if total == 0 && t > 0 {
        bail!("attention: {t} queries and no keys (a query always sees at least itself)");
    }
    if mask.dims() != [b, 1, t, total] {
        bail!("attention: mask {:?} for {t} queries and {total} keys of {b} sequences", mask.dims());
    }
    let (q, mask) = (q.contiguous()?, mask.contiguous()?);
    // A cache's keys are a view (b, kv, total, hd) of a longer buffer: read in place as long as
    // each key's values are adjacent.
    let rows_adjacent = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    let (k, v) = (rows_adjacent(k)?, rows_adjacent(v)?);
    let (q_guard, q_layout) = q.storage_and_layout();
    let (k_guard, k_layout) = k.storage_and_layout();
    let (v_guard, v_layout) = v.storage_and_layout();
    let (m_guard, m_layout) = mask.storage_and_layout();
    let (qd, kd, vd, md) =
        (values(&q_guard, q_layout)?, values(&k_guard, k_layout)?, values(&v_guard, v_layout)?, values(&m_guard, m_layout)?);
    let (ks, vs) = (k_layout.stride(), v_layout.stride());
    let (rep, scale, width) = (heads / kv, scale as f32, heads * hd);
    // One task per block of a sequence's queries, all heads: it owns the block's output rows.
    let mut y = vec![0f32; b * t * width];
    if y.is_empty() {
        return Tensor::from_vec(y, (b, t, width), q.device());
    }
    y.par_chunks_mut((t * width).max(1)).enumerate().try_for_each(|(seq, rows)| {
        rows.par_chunks_mut(QUERY_BLOCK * width).enumerate().try_for_each_init(Vec::new, |scores, (block, out)| {
            let (first, n) = (block * QUERY_BLOCK, out.len() / width);
            let masks = &md[(seq * t + first) * total..(seq * t + first + n) * total];
            let seen = masks.chunks(total).map(keys_seen).max().unwrap_or(total);
            for h in 0..heads {
                let g = h / rep;
                let keys = View::strided(&kd[seq * ks[0] + g * ks[1]..], total, hd, ks[2]);
                let vals = View::strided(&vd[seq * vs[0] + g * vs[1]..], total, hd, vs[2]);
                let queries = View::rows(&qd[((seq * heads + h) * t + first) * hd..], n, hd);
                attend_block(queries, (keys, vals), masks, (scale, seen), scores, (&mut out[h * hd..], width))?;
            }
            Ok::<_, candle_core::Error>(())
        })
    })?;
    Tensor::from_vec(y, (b, t, width), q.device())
}

/// Queries per block of a task: a block's products stop at the last key one of its queries sees,
/// so the masked corner of a causal pass (~40% of its scores at 256 tokens) is never computed.
const QUERY_BLOCK: usize = 64;

/// How many keys of a query's mask row it sees: all up to its last key not masked out
/// (additive [`MASKED`] or below). The scores of the keys after it would all be `exp(-1e9)`,
/// exactly zero, and they add nothing but zeros to the softmax's lane sums and to the product
/// with the values, so leaving them out changes no bit of the output (the lanes of the kept keys
/// are the same); a test holds it.
fn keys_seen(mask_row: &[f32]) -> usize {
    // A causal row is half masked: scanned 16 values at a time (a branch-free test per chunk).
    const CHUNK: usize = 16;
    let mut end = mask_row.len();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mask_row[start..end];
        if chunk.iter().fold(false, |seen, &m| seen | (m > MASKED)) {
            return start + chunk.iter().rposition(|&m| m > MASKED).map_or(0, |last| last + 1);
        }
        end = start;
    }
    mask_row.len()
}

/// Additive mask value of a key a query does not see: large enough to zero its probability,
/// finite so that no row is all -inf.
pub const MASKED: f32 = -1e9;

/// One block of queries (n, hd) of one head against the first `seen` keys and values:
/// softmax(q k^T * scale + mask) v into the n rows of `out`, `out_rs` apart; `scores` is scratch.
fn attend_block(
    queries: View,
    (keys, vals): (View, View),
    masks: &[f32],
    (scale, seen): (f32, usize),
    scores: &mut Vec<f32>,
    (out, out_rs): (&mut [f32], usize),
) -> Result<()> {
    let n = queries.n_rows();
    let total = masks.len() / n.max(1);
    scores.resize(n * seen, 0.0);
    matmul(scores, seen, queries, keys.first_rows(seen).t(), false, false)?;
    for (row, mask_row) in scores.chunks_mut(seen).zip(masks.chunks(total)) {
        row.iter_mut().zip(mask_row).for_each(|(s, &m)| *s = *s * scale + m);
        vexp::softmax_in_place(row);
    }
    matmul(out, out_rs, View::rows(scores, n, seen), vals.first_rows(seen), false, false)
}

/// The f32 values of a CPU tensor from its first element on (strided or not).
fn values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(candle_core::CpuStorage::F32(data)) => Ok(&data[layout.start_offset()..]),
        _ => bail!("attention: f32 CPU tensors expected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// candle's composed ops: the reference.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, heads, t, hd) = q.dims4().unwrap();
        let kv = k.dim(1).unwrap();
        let rep = heads / kv;
        let expand = |x: &Tensor| {
            let (b, kv, n, d) = x.dims4().unwrap();
            x.unsqueeze(2).unwrap().expand((b, kv, rep, n, d)).unwrap().reshape((b, kv * rep, n, d)).unwrap()
        };
        let (k, v) = (expand(&k.contiguous().unwrap()), expand(&v.contiguous().unwrap()));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(mask).unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, heads * hd)).unwrap()
    }

    /// Against the composed ops: grouped heads, a causal mask over a cache's strided view with
    /// room left in its buffer, a decode step (one query) and a fully visible row.
    #[test]
    fn matches_the_composed_ops_on_a_cache_view() {
        let dev = Device::Cpu;
        let (b, heads, kv, hd, cap) = (3, 6, 2, 8, 11);
        for (t, total) in [(5, 7), (1, 9), (4, 4)] {
            let q = Tensor::randn(0f32, 1.0, (b, heads, t, hd), &dev).unwrap();
            let buffer_k = Tensor::randn(0f32, 1.0, (b, kv, cap, hd), &dev).unwrap();
            let buffer_v = Tensor::randn(0f32, 1.0, (b, kv, cap, hd), &dev).unwrap();
            let (k, v) = (buffer_k.narrow(2, 0, total).unwrap(), buffer_v.narrow(2, 0, total).unwrap());
            assert!(!k.is_contiguous());
            // Query i of sequence s sees keys up to total - t + i, less the first s (left padding).
            let mask: Vec<f32> = (0..b)
                .flat_map(|s| {
                    (0..t).flat_map(move |i| {
                        (0..total).map(move |j| if j <= total - t + i && (j >= s || j == total - t + i) { 0.0 } else { -1e9 })
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (b, 1, t, total), &dev).unwrap();
            let got = attention(&q, &k, &v, &mask, 0.3).unwrap();
            let want = composed(&q, &k, &v, &mask, 0.3);
            assert_eq!(got.dims(), [b, t, heads * hd]);
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "t {t}, total {total}: {err}");
        }
        let q = Tensor::zeros((1, 3, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 2, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, &Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &dev).unwrap(), 1.0).is_err());
        let none = Tensor::zeros((1, 2, 0, 4), candle_core::DType::F32, &dev).unwrap();
        let q = Tensor::zeros((1, 4, 2, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(attention(&q, &none, &none, &Tensor::zeros((1, 1, 2, 0), candle_core::DType::F32, &dev).unwrap(), 1.0).is_err());
    }

    /// Leaving out the keys after a query block's last seen one changes no bit: against the same
    /// blocks over every key, for a causal pass of several blocks over a cache with left padding.
    #[test]
    fn trimming_masked_keys_changes_no_bit() {
        let dev = Device::Cpu;
        let (b, heads, kv, hd, t, past) = (2, 4, 2, 64, 2 * QUERY_BLOCK + 9, 5);
        let total = past + t;
        let pad = [0usize, 3];
        let q = Tensor::randn(0f32, 1.0, (b, heads, t, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, kv, total, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kv, total, hd), &dev).unwrap();
        let mask: Vec<f32> = pad
            .iter()
            .flat_map(|&p| (0..t).flat_map(move |i| (0..total).map(move |j| if j >= p && j <= past + i { 0.0 } else { MASKED })))
            .collect();
        let got: Vec<f32> = attention(&q, &k, &v, &Tensor::from_vec(mask.clone(), (b, 1, t, total), &dev).unwrap(), 0.25)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(keys_seen(&mask[..total]) < total, "the first query sees every key: nothing to trim");
        let (qd, kd, vd): (Vec<f32>, Vec<f32>, Vec<f32>) = [&q, &k, &v].map(|x| x.flatten_all().unwrap().to_vec1().unwrap()).into();
        let mut scores = Vec::new();
        // The same blocks of queries, each over every key.
        for seq in 0..b {
            for h in 0..heads {
                let g = h / (heads / kv);
                let kv_at = (seq * kv + g) * total * hd;
                for first in (0..t).step_by(QUERY_BLOCK) {
                    let n = QUERY_BLOCK.min(t - first);
                    let mut out = vec![0f32; n * hd];
                    attend_block(
                        View::rows(&qd[((seq * heads + h) * t + first) * hd..], n, hd),
                        (View::rows(&kd[kv_at..], total, hd), View::rows(&vd[kv_at..], total, hd)),
                        &mask[(seq * t + first) * total..(seq * t + first + n) * total],
                        (0.25, total),
                        &mut scores,
                        (&mut out, hd),
                    )
                    .unwrap();
                    for (i, want) in out.chunks(hd).enumerate() {
                        let at = ((seq * t + first + i) * heads + h) * hd;
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got[at..at + hd]), bits(want), "sequence {seq}, head {h}, query {}", first + i);
                    }
                }
            }
        }
    }
}
