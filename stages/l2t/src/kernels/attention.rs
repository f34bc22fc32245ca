//! Attention without a gradient (sampling, scoring, `J`'s passes) over f32 CPU tensors.
//!
//! candle's path is a chain of batched ops (the scores' product, the masked softmax, the product
//! with the values, the copy back to rows), each its own parallel region over every head, with
//! the cores waiting at each op's end and the small products of a decode step left on one core.
//! Here one parallel task per (sequence, kv head) does all of it on its own core: the scores of
//! the query heads that share the kv head, their softmax in place, and their product with the
//! values; the keys and values are read where they lie (a cache's buffers, no copy).

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
    let (rep, scale) = (heads / kv, scale as f32);
    // By head first, (b, heads, t, hd): task (sequence, kv head) owns one contiguous block.
    let mut by_head = vec![0f32; b * heads * t * hd];
    if by_head.is_empty() {
        return Tensor::from_vec(by_head, (b, t, heads * hd), q.device());
    }
    by_head.par_chunks_mut(rep * t * hd).enumerate().try_for_each(|(task, out)| {
        let (seq, g) = (task / kv, task % kv);
        let queries = View::rows(&qd[(seq * heads + g * rep) * t * hd..], rep * t, hd);
        let keys = View::strided(&kd[seq * ks[0] + g * ks[1]..], total, hd, ks[2]);
        let vals = View::strided(&vd[seq * vs[0] + g * vs[1]..], total, hd, vs[2]);
        let mut scores = vec![0f32; rep * t * total];
        matmul(&mut scores, total, queries, keys.t(), false, false)?;
        for (r, row) in scores.chunks_mut(total).enumerate() {
            let query = r % t;
            let mask_row = &md[(seq * t + query) * total..(seq * t + query + 1) * total];
            row.iter_mut().zip(mask_row).for_each(|(s, &m)| *s = *s * scale + m);
            vexp::softmax_in_place(row);
        }
        matmul(out, hd, View::rows(&scores, rep * t, total), vals, false, false)
    })?;
    // Back to rows: (b, t, heads * hd).
    let mut y = vec![0f32; by_head.len()];
    y.par_chunks_mut(t * heads * hd).enumerate().for_each(|(seq, rows)| {
        for (query, row) in rows.chunks_mut(heads * hd).enumerate() {
            for (h, out) in row.chunks_mut(hd).enumerate() {
                let at = ((seq * heads + h) * t + query) * hd;
                out.copy_from_slice(&by_head[at..at + hd]);
            }
        }
    });
    Tensor::from_vec(y, (b, t, heads * hd), q.device())
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
}
