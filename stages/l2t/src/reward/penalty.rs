//! Compression penalty (l2t-spec section 5): the Fisher quadratic form of each episode along the
//! low-rank update direction of one MLP block,
//!
//! ```text
//! g(i,k) = grad_theta~ sum_{t in episode k} log pi_theta(z_{i,t} | prefix)
//! C(i,k) = (g(i,k) . D~)^2 + damping * ||D~||^2,     D~ = top-r SVD of (theta_now - theta_ref)
//! ```
//!
//! Only `g . D~` is needed, a directional derivative: `jvp` carries its tangent forward from the
//! block to every token's log-probability in one pass (exact, in f32, every episode at once);
//! `fd` takes it by a central difference of the episode log-likelihoods at `theta +- eps D~`,
//! `grad` by one backward pass per episode. The trunk below the block does not depend on
//! `theta~`, so it runs once in f32 (the pass `J` reads too, [`super::prefill`]); for `fd` and
//! `grad` the block and what follows run in f64, where a step of `eps D~` is far above rounding
//! noise.

use super::prefill::SharedPrompts;
use crate::config::{Estimator, Scale};
use crate::model::qwen2::MlpWeights;
use crate::model::{token_logprobs, Model};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use faer::{Mat, MatRef, Side};

/// `r = max(1, ceil(rank_fraction * min(rows, cols)))` (spec 5).
pub fn rank_for(rows: usize, cols: usize, rank_fraction: f64) -> usize {
    ((rank_fraction * rows.min(cols) as f64).ceil() as usize).clamp(1, rows.min(cols).max(1))
}

/// `D~ = U_r S_r V_r^T`: the best rank-`r` approximation of `d` (all zeros stays all zeros).
pub fn low_rank(d: MatRef<f64>, r: usize) -> Mat<f64> {
    if (0..d.ncols()).all(|j| (0..d.nrows()).all(|i| d[(i, j)] == 0.0)) {
        return d.to_owned();
    }
    // The projection onto the top-r singular subspace of the smaller side, from the eigenvectors
    // of the Gram matrix (n x n for n = min(rows, cols)): the same matrix as the truncated SVD,
    // U_r S_r V_r^T = D V_r V_r^T, at a third of its cost on the proxy block's shapes. Squaring
    // the condition number only touches the small singular values, which are discarded.
    let wide = d.nrows() < d.ncols();
    let gram = if wide { d * d.transpose() } else { d.transpose() * d };
    let Ok(eig) = gram.self_adjoint_eigen(Side::Lower) else {
        // Only a Gram matrix holding a NaN or an infinity gets here: D~ carries it on.
        return Mat::from_fn(d.nrows(), d.ncols(), |_, _| f64::NAN);
    };
    let (values, vectors) = (eig.S().column_vector(), eig.U());
    let mut order: Vec<usize> = (0..values.nrows()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let basis = Mat::from_fn(vectors.nrows(), r.min(order.len()), |i, k| vectors[(i, order[k])]);
    if wide {
        &basis * (basis.transpose() * d)
    } else {
        (d * &basis) * basis.transpose()
    }
}

/// `C = (g . D~)^2 + damping * ||D~||^2` (spec 5).
pub fn c_fisher(g_dot_d: f64, d_norm_sq: f64, damping: f64) -> f64 {
    g_dot_d * g_dot_d + damping * d_norm_sq
}

/// `g . D~ ~= (l(+) - l(-)) / (2 eps)` (spec 5, estimator `fd`).
pub fn fd_directional(l_plus: f64, l_minus: f64, eps: f64) -> f64 {
    (l_plus - l_minus) / (2.0 * eps)
}

/// The batch's raw `C` put on the scale of `dI` as `penalty.scale` says (spec 5): every
/// episode's `C~`, and the gain-matched figures when that scaling ran.
pub fn scale_penalties(c: &[f64], d_i: &[f64], in_e: &[bool], scale: Scale, cap_quantile: f64) -> (Vec<f64>, Option<GainMatched>) {
    match scale {
        Scale::GainMatched => {
            let g = scale_gain_matched(c, d_i, in_e, cap_quantile);
            (g.c_scaled.clone(), Some(g))
        }
        Scale::BatchMedian => (scale_by_batch_median(c), None),
        Scale::None => (c.to_vec(), None),
    }
}

/// `C / median(nonzero C)` over the batch; all zeros stay zeros (spec 5, `batch-median`).
pub fn scale_by_batch_median(c: &[f64]) -> Vec<f64> {
    let mut nonzero: Vec<f64> = c.iter().copied().filter(|&v| v != 0.0).collect();
    if nonzero.is_empty() {
        return c.to_vec();
    }
    nonzero.sort_by(f64::total_cmp);
    let n = nonzero.len();
    let median = if n % 2 == 1 { nonzero[n / 2] } else { 0.5 * (nonzero[n / 2 - 1] + nonzero[n / 2]) };
    c.iter().map(|v| v / median).collect()
}

/// The `p`-quantile of `values` with linear interpolation between order statistics (numpy's
/// default); `None` for no values.
pub fn quantile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let h = (sorted.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// `gain-matched` scaling of one batch (spec 5, revised 2026-12-01), with the figures it used.
#[derive(Debug, Clone, PartialEq)]
pub struct GainMatched {
    /// `C~(e)` for every episode given.
    pub c_scaled: Vec<f64>,
    /// `q`, the cap: the `cap_quantile` of the nonzero `C` over `E` (0 when there is none).
    pub q: f64,
    /// `mean_E |dI(e)|`.
    pub mean_abs_d_i: f64,
    /// `mean_E C^(e)`, the capped penalty's mean.
    pub mean_c_capped: f64,
}

/// ```text
/// q      = cap_quantile of the nonzero C(e), e in E
/// C^(e)  = min(C(e), q)
/// C~(e)  = C^(e) * mean_E |dI(e)| / mean_E C^(e)        (C~ = 0 when every C is 0)
/// ```
///
/// `in_e` marks the episodes of `E` (those of rollouts that take part in training); the figures
/// come from `E` alone, and every episode is scaled with them.
pub fn scale_gain_matched(c: &[f64], d_i: &[f64], in_e: &[bool], cap_quantile: f64) -> GainMatched {
    let members = || c.iter().zip(d_i).zip(in_e).filter(|(_, &m)| m).map(|((&c, &d), _)| (c, d));
    let nonzero: Vec<f64> = members().map(|(c, _)| c).filter(|&c| c != 0.0).collect();
    let Some(q) = quantile(&nonzero, cap_quantile) else {
        return GainMatched { c_scaled: vec![0.0; c.len()], q: 0.0, mean_abs_d_i: 0.0, mean_c_capped: 0.0 };
    };
    let n = members().count() as f64;
    let mean_abs_d_i = members().map(|(_, d)| d.abs()).sum::<f64>() / n;
    let mean_c_capped = members().map(|(c, _)| c.min(q)).sum::<f64>() / n;
    let factor = mean_abs_d_i / mean_c_capped;
    GainMatched { c_scaled: c.iter().map(|&c| c.min(q) * factor).collect(), q, mean_abs_d_i, mean_c_capped }
}

/// The proxy block's update direction, projected.
#[derive(Debug, Clone)]
pub struct Direction {
    /// `D~` of gate, up and down, as f64 tensors.
    pub block: MlpWeights,
    /// `||D~||^2` summed over the three matrices.
    pub norm_sq: f64,
    /// The rank kept for each matrix.
    pub ranks: [usize; 3],
}

impl Direction {
    pub fn is_zero(&self) -> bool {
        self.norm_sq == 0.0
    }
}

/// `a - b` of two matrices of one shape, in f64.
fn difference(a: &Tensor, b: &Tensor) -> Result<Mat<f64>> {
    let (rows, cols) = a.dims2()?;
    let values = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (a, b) = (values(a)?, values(b)?);
    Ok(Mat::from_fn(rows, cols, |i, j| a[i * cols + j] - b[i * cols + j]))
}

fn from_matrix(m: MatRef<f64>, like: &Tensor) -> Result<Tensor> {
    let values: Vec<f64> = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)])).collect(); // row-major
    Ok(Tensor::from_vec(values, (m.nrows(), m.ncols()), like.device())?)
}

/// `D~` of `theta_now - theta_ref`, each matrix projected to its top singular directions.
pub fn direction(now: &MlpWeights, reference: &MlpWeights, rank_fraction: f64) -> Result<Direction> {
    // One matrix after the other on the calling thread: fisher-reward runs this beside J's
    // pass, which keeps the cores busy.
    let projected: Vec<(Tensor, usize, f64)> = now
        .matrices()
        .into_iter()
        .zip(reference.matrices())
        .map(|(a, b)| {
            if a.dims() != b.dims() {
                bail!(
                    "the proxy block's matrices differ in shape between the policy and the base policy: {:?} vs {:?}",
                    a.dims(),
                    b.dims()
                );
            }
            let d = difference(a, b)?;
            let rank = rank_for(d.nrows(), d.ncols(), rank_fraction);
            let d_tilde = low_rank(d.as_ref(), rank);
            Ok((from_matrix(d_tilde.as_ref(), a)?, rank, d_tilde.squared_norm_l2()))
        })
        .collect::<Result<_>>()?;
    let Ok::<[_; 3], _>([(gate, r_gate, n_gate), (up, r_up, n_up), (down, r_down, n_down)]) = projected.try_into() else {
        bail!("the proxy block has three matrices");
    };
    Ok(Direction { block: MlpWeights::from_matrices([gate, up, down]), norm_sq: n_gate + n_up + n_down, ranks: [r_gate, r_up, r_down] })
}

/// The policy in f32 (`trunk`), with, for `fd` and `grad`, the proxy block and the model above
/// it in f64.
pub struct ProxyModel<'a> {
    pub trunk: &'a Model,
    /// The layers from the proxy block's up, the final norm and the head, in f64, renumbered
    /// from 0 ([`crate::model::build_top_as`]); `jvp` needs none.
    pub tail: Option<&'a Model>,
    /// The proxy block's layer in `trunk`.
    pub layer: usize,
}

/// `theta~ + scale * D~`, in f64.
fn shifted(theta: &MlpWeights, dir: &MlpWeights, scale: f64) -> Result<MlpWeights> {
    let mut out = Vec::with_capacity(3);
    for (t, d) in theta.matrices().into_iter().zip(dir.matrices()) {
        out.push((t.to_dtype(DType::F64)? + (d * scale)?)?);
    }
    let [gate, up, down]: [Tensor; 3] = out.try_into().expect("three matrices");
    Ok(MlpWeights::from_matrices([gate, up, down]))
}

/// Sum of `logp` (one row) over each episode's response tokens.
fn episode_sums(logp: &[f64], offset: usize, spans: &[(usize, usize)]) -> Vec<f64> {
    spans.iter().map(|&(s, e)| logp[offset + s..offset + e].iter().sum()).collect()
}

/// `g(i,k) . D~` for every episode of every rollout of `layout` (`spans[i]`: row `i`'s episodes
/// as token spans over its response), at the trunk's own proxy block weights, from `mid`: the
/// residual entering the proxy block's MLP over the layout, in f32 ([`SharedPrompts::prefill`]
/// capturing `model.layer`, or [`Model::forward_to_mlp`]). The trunk below the block does not
/// depend on its weights, so that one pass serves every estimator.
pub fn directional_derivatives(
    model: &ProxyModel,
    dir: &Direction,
    layout: &SharedPrompts,
    mid: &Tensor,
    spans: &[Vec<(usize, usize)>],
    estimator: Estimator,
    eps: f64,
) -> Result<Vec<Vec<f64>>> {
    if spans.len() != layout.rows() || mid.dims().get(..2) != Some(&[layout.rows(), layout.columns()][..]) {
        bail!("{} rollouts, {} span lists and a residual of shape {:?}: they do not match", layout.rows(), spans.len(), mid.dims());
    }
    for (i, spans) in spans.iter().enumerate() {
        if spans.iter().any(|&(s, e)| s > e || e > layout.response_len(i)) {
            bail!("rollout {i}: an episode span outside the response: {spans:?}");
        }
    }
    if layout.rows() == 0 {
        return Ok(Vec::new());
    }
    let theta = model.trunk.mlp_weights(model.layer);
    let dev = mid.device();
    let (positions, mask, targets) = (layout.positions(dev)?, layout.mask(dev)?, layout.targets(0, dev)?);
    if estimator == Estimator::Jvp {
        let dtype = mid.dtype();
        let [gate, up, down] = dir.block.matrices().map(|m| m.to_dtype(dtype));
        let dir = MlpWeights::from_matrices([gate?, up?, down?]);
        let windows = layout.response_windows();
        let dlogp = model.trunk.jvp_target_logprobs(mid, &positions, &mask, model.layer, (&theta, &dir), &targets, &windows)?;
        return Ok(dlogp
            .iter()
            .zip(spans)
            .map(|(row, spans)| episode_sums(&row.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), 0, spans))
            .collect());
    }
    let tail = model.tail.context("the fd and grad estimators need the f64 tail of the model")?;
    let x_mid = mid.to_dtype(DType::F64)?;
    let offset = layout.response_offset();
    match estimator {
        Estimator::Jvp => unreachable!("taken above"),
        Estimator::Fd => {
            let episode_logp = |sign: f64| -> Result<Vec<Vec<f64>>> {
                let block = shifted(&theta, &dir.block, sign * eps)?;
                let logits = tail.forward_from_mlp(&x_mid, &positions, &mask, 0, &block)?;
                let logp: Vec<Vec<f64>> = token_logprobs(&logits, &targets)?.to_vec2()?;
                Ok(logp.iter().zip(spans).map(|(logp, spans)| episode_sums(logp, offset, spans)).collect())
            };
            let (plus, minus) = (episode_logp(1.0)?, episode_logp(-1.0)?);
            Ok(plus.iter().zip(&minus).map(|(p, m)| p.iter().zip(m).map(|(&lp, &lm)| fd_directional(lp, lm, eps)).collect()).collect())
        }
        Estimator::Grad => {
            let base = shifted(&theta, &dir.block, 0.0)?;
            let mut out = Vec::with_capacity(spans.len());
            for (r, spans) in spans.iter().enumerate() {
                let vars = base.matrices().map(|m| Var::from_tensor(m).context("proxy block variable"));
                let [gate, up, down] = vars;
                let (gate, up, down) = (gate?, up?, down?);
                let block = MlpWeights::from_matrices([gate.as_tensor().clone(), up.as_tensor().clone(), down.as_tensor().clone()]);
                let row = |t: &Tensor| t.narrow(0, r, 1);
                let logits = tail.forward_from_mlp(&row(&x_mid)?, &row(&positions)?, &row(&mask)?, 0, &block)?;
                let logp = token_logprobs(&logits, &row(&targets)?)?.squeeze(0)?;
                let mut per_episode = Vec::with_capacity(spans.len());
                for &(s, e) in spans {
                    if s == e {
                        per_episode.push(0.0);
                        continue;
                    }
                    let l_k = logp.narrow(0, offset + s, e - s)?.sum_all()?;
                    let grads = l_k.backward()?;
                    let mut g_dot_d = 0.0;
                    for (var, d) in [&gate, &up, &down].into_iter().zip(dir.block.matrices()) {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            g_dot_d += (g * d)?.sum_all()?.to_scalar::<f64>()?;
                        }
                    }
                    per_episode.push(g_dot_d);
                }
                out.push(per_episode);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build_model, build_top_as, init_weights, Weights};
    use candle_core::Device;

    #[test]
    fn each_scale_by_hand() {
        // C = [0, 2, 4, 10], dI = [1, -1, 0.5, 0.5], all in E.
        let (c, d, in_e) = ([0.0, 2.0, 4.0, 10.0], [1.0, -1.0, 0.5, 0.5], [true; 4]);
        assert_eq!(scale_penalties(&c, &d, &in_e, Scale::None, 0.9), (c.to_vec(), None));
        // batch-median: the median of the nonzero C is 4.
        assert_eq!(scale_penalties(&c, &d, &in_e, Scale::BatchMedian, 0.9).0, vec![0.0, 0.5, 1.0, 2.5]);
        // gain-matched with the cap at the 0.5-quantile of {2, 4, 10} = 4: capped C = [0, 2, 4, 4]
        // (mean 2.5), mean |dI| = 0.75, so C~ = capped * 0.3.
        let (scaled, gain) = scale_penalties(&c, &d, &in_e, Scale::GainMatched, 0.5);
        let gain = gain.unwrap();
        assert_eq!((gain.q, gain.mean_abs_d_i, gain.mean_c_capped), (4.0, 0.75, 2.5));
        for (got, want) in scaled.iter().zip([0.0, 0.6, 1.2, 1.2]) {
            assert!((got - want).abs() < 1e-12, "{scaled:?}");
        }
    }

    #[test]
    fn c_on_a_2x2_example() {
        // g = [[1, 0], [0, 2]], D~ = [[0.5, 1], [0, 0.25]]: g.D~ = 0.5 + 0.5 = 1,
        // ||D~||^2 = 0.25 + 1 + 0.0625 = 1.3125, so C = 1 + 1e-5 * 1.3125.
        let (g, d) = ([1.0, 0.0, 0.0, 2.0], [0.5, 1.0, 0.0, 0.25]);
        let g_dot_d: f64 = g.iter().zip(&d).map(|(g, d)| g * d).sum();
        assert!((g_dot_d - 1.0).abs() < 1e-12);
        let c = c_fisher(g_dot_d, d.iter().map(|d| d * d).sum(), 1e-5);
        assert!((c - (1.0 + 1.3125e-5)).abs() < 1e-15, "{c}");
    }

    #[test]
    fn low_rank_keeps_the_top_singular_directions() {
        let matrix = |rows: usize, cols: usize, values: &[f64]| Mat::from_fn(rows, cols, |i, j| values[i * cols + j]);
        // diag(3, 1) at rank 1 is diag(3, 0); a rank-1 matrix is its own projection.
        let d = matrix(2, 2, &[3.0, 0.0, 0.0, 1.0]);
        assert!((low_rank(d.as_ref(), 1) - matrix(2, 2, &[3.0, 0.0, 0.0, 0.0])).norm_l2() < 1e-12);
        let outer = matrix(3, 2, &[1.0, 2.0, 2.0, 4.0, -1.0, -2.0]);
        assert!((low_rank(outer.as_ref(), 1) - &outer).norm_l2() < 1e-12);
        assert_eq!(low_rank(Mat::<f64>::zeros(2, 3).as_ref(), 1), Mat::<f64>::zeros(2, 3));
        // A non-finite update gives a non-finite D~ (caught downstream), not a panic.
        assert!(low_rank(matrix(2, 2, &[f64::NAN, 0.0, 0.0, 1.0]).as_ref(), 1)[(0, 0)].is_nan());
        // The truncated SVD itself, tall and wide.
        for (rows, cols) in [(40, 12), (12, 40)] {
            let d = Mat::from_fn(rows, cols, |i, j| ((i * 37 + j * 11) % 23) as f64 / 23.0 - 0.5 + if i == j { 2.0 } else { 0.0 });
            let svd = d.svd().unwrap();
            let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
            let mut order: Vec<usize> = (0..s.nrows()).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
            let want = order.iter().take(3).fold(Mat::<f64>::zeros(rows, cols), |acc, &i| acc + u.col(i) * s[i] * v.col(i).transpose());
            assert!((low_rank(d.as_ref(), 3) - &want).norm_l2() < 1e-9 * want.norm_l2(), "{rows}x{cols}");
        }
        // r = max(1, ceil(0.05 * min)): 512x128 -> 7, 4x4 -> 1.
        assert_eq!(rank_for(512, 128, 0.05), 7);
        assert_eq!(rank_for(4, 4, 0.05), 1);
    }

    #[test]
    fn batch_median_scaling_ignores_zeros() {
        // nonzero {2, 4, 8, 1} -> median (2 + 4) / 2 = 3.
        let scaled = scale_by_batch_median(&[0.0, 2.0, 4.0, 8.0, 1.0]);
        let want = [0.0, 2.0 / 3.0, 4.0 / 3.0, 8.0 / 3.0, 1.0 / 3.0];
        for (a, b) in scaled.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{scaled:?}");
        }
        assert_eq!(scale_by_batch_median(&[0.0, 0.0]), vec![0.0, 0.0]);
        assert!((fd_directional(1.5, 0.5, 0.25) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        // np.quantile([1, 2, 3, 4, 100], 0.9): h = 4 * 0.9 = 3.6 -> 4 + 0.6 * 96 = 61.6.
        assert!((quantile(&[100.0, 2.0, 1.0, 4.0, 3.0], 0.9).unwrap() - 61.6).abs() < 1e-12);
        assert_eq!(quantile(&[5.0], 0.9), Some(5.0));
        assert_eq!(quantile(&[], 0.9), None);
    }

    #[test]
    fn gain_matched_caps_and_makes_beta_the_ratio_of_means() {
        // E = the first five episodes; the sixth (an excluded rollout's) is scaled but not counted.
        let c = [1.0, 2.0, 0.0, 4.0, 100.0, 1000.0];
        let d_i = [0.5, -0.3, 0.1, 0.2, -0.4, 9.0];
        let in_e = [true, true, true, true, true, false];
        let g = scale_gain_matched(&c, &d_i, &in_e, 0.9);
        // nonzero C over E {1, 2, 4, 100}: h = 3 * 0.9 = 2.7 -> 4 + 0.7 * 96 = 71.2.
        assert!((g.q - 71.2).abs() < 1e-12, "{g:?}");
        // C^ over E = {1, 2, 0, 4, 71.2}: mean 78.2 / 5 = 15.64; mean |dI| = 1.5 / 5 = 0.3.
        assert!((g.mean_c_capped - 15.64).abs() < 1e-12 && (g.mean_abs_d_i - 0.3).abs() < 1e-12, "{g:?}");
        let factor = 0.3 / 15.64;
        let want = [1.0 * factor, 2.0 * factor, 0.0, 4.0 * factor, 71.2 * factor, 71.2 * factor];
        for (a, b) in g.c_scaled.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{g:?}");
        }
        // beta as the ratio: over E, mean beta * C~ = beta * mean |dI|.
        let mean_c_tilde = g.c_scaled[..5].iter().sum::<f64>() / 5.0;
        assert!((0.6 * mean_c_tilde - 0.6 * 0.3).abs() < 1e-12);
        // No single episode's penalty exceeds the cap's share: C~ <= q * factor.
        assert!(g.c_scaled.iter().all(|&v| v <= 71.2 * factor + 1e-12));
    }

    #[test]
    fn gain_matched_all_zero_gives_zero() {
        // Iteration 0 (D~ = 0): every C is 0, so C~ = 0 and no figure is NaN.
        let g = scale_gain_matched(&[0.0, 0.0, 0.0], &[0.4, -0.2, 0.0], &[true; 3], 0.9);
        assert_eq!(g, GainMatched { c_scaled: vec![0.0; 3], q: 0.0, mean_abs_d_i: 0.0, mean_c_capped: 0.0 });
        // Nonzero C only outside E: nothing to match against, so zero too.
        let g = scale_gain_matched(&[0.0, 5.0], &[0.4, 0.1], &[true, false], 0.9);
        assert_eq!(g.c_scaled, vec![0.0, 0.0]);
    }

    /// `g . D~` of every episode of every request.
    type PerEpisode = Vec<Vec<f64>>;

    fn small() -> (crate::model::Config, Weights) {
        let cfg = crate::model::test_config(32, 64, 2, 4, 2);
        let w = init_weights(&cfg, 7, &Device::Cpu).unwrap();
        (cfg, w)
    }

    /// Derivatives of the three estimators for a policy moved away from its reference along a random
    /// direction in MLP block `layer`.
    fn estimates(
        cfg: &crate::model::Config,
        reference: &Weights,
        moved: &Weights,
        layer: usize,
    ) -> (Direction, PerEpisode, PerEpisode, PerEpisode) {
        let dev = Device::Cpu;
        let trunk = build_model(cfg, moved, &dev).unwrap();
        let tail = build_top_as(cfg, moved, layer, DType::F64, &dev).unwrap();
        let reference_model = build_model(cfg, reference, &dev).unwrap();
        let dir = direction(&trunk.mlp_weights(layer), &reference_model.mlp_weights(layer), 0.25).unwrap();
        let proxy = ProxyModel { trunk: &trunk, tail: Some(&tail), layer };
        // The third rollout shares the first's prompt (one prompt row for both in the pass).
        let (p1, z1, s1) = (vec![5u32, 6, 7], vec![10u32, 11, 12, 13, 14, 15, 16], vec![(0, 3), (3, 5), (5, 7)]);
        let (p2, z2, s2) = (vec![9u32, 8], vec![20u32, 21, 22], vec![(0, 1), (1, 3)]);
        let (z3, s3) = (vec![30u32, 31], vec![(0, 2)]);
        let layout = SharedPrompts::new(&[(&p1, &z1), (&p2, &z2), (&p1, &z3)]).unwrap();
        let mid = layout.prefill(&trunk, 0, Some(layer), 0).unwrap().mid.unwrap();
        let spans = [s1, s2, s3];
        let estimate = |estimator| directional_derivatives(&proxy, &dir, &layout, &mid, &spans, estimator, 1e-3).unwrap();
        let (fd, grad, jvp) = (estimate(Estimator::Fd), estimate(Estimator::Grad), estimate(Estimator::Jvp));
        (dir, fd, grad, jvp)
    }

    /// `fd` agrees with `grad` to its truncation error; `jvp`, exact in f32, to 1e-3 relative: on
    /// each family (Qwen2 with q/k/v biases, Llama, Qwen3 with q/k norms), for the last block
    /// (the default) and one below it (the tangent then crosses a whole layer).
    #[test]
    fn fd_grad_and_jvp_estimators_agree() {
        for (family, bias) in [("qwen2", true), ("llama", false), ("qwen3", false)] {
            let (mut cfg, _) = small();
            cfg.model_type = family.into();
            cfg.attention_bias = Some(bias);
            let reference = init_weights(&cfg, 7, &Device::Cpu).unwrap();
            let mut moved = reference.clone();
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(11);
            for layer in 0..cfg.num_hidden_layers {
                for name in MlpWeights::names(layer) {
                    let w = &moved[&name];
                    let noise: Vec<f32> = (0..w.elem_count()).map(|_| 0.05 * crate::model::standard_normal(&mut rng)).collect();
                    let noise = Tensor::from_vec(noise, w.dims(), &Device::Cpu).unwrap();
                    moved.insert(name.clone(), (w + noise).unwrap());
                }
            }
            for layer in [cfg.num_hidden_layers - 1, 0] {
                let (dir, fd, grad, jvp) = estimates(&cfg, &reference, &moved, layer);
                assert!(dir.norm_sq > 0.0);
                let mut compared = 0;
                for ((f, g), j) in fd.iter().flatten().zip(grad.iter().flatten()).zip(jvp.iter().flatten()) {
                    if g.abs() > 1e-4 {
                        let rel = |x: f64| (x - g).abs() / g.abs();
                        assert!(rel(*f) < 1e-2, "{family} layer {layer}: fd {f} vs grad {g}");
                        assert!(rel(*j) < 1e-3, "{family} layer {layer}: jvp {j} vs grad {g}: relative error {}", rel(*j));
                        compared += 1;
                    }
                }
                assert!(compared >= 3, "{family} layer {layer}: too few episodes with a measurable derivative: {grad:?}");
            }
        }
    }

    #[test]
    fn c_is_zero_when_the_policy_is_its_reference() {
        let (cfg, reference) = small();
        let (dir, fd, grad, jvp) = estimates(&cfg, &reference, &reference, cfg.num_hidden_layers - 1);
        assert!(dir.is_zero());
        for g_dot_d in fd.iter().chain(&grad).chain(&jvp).flatten() {
            assert_eq!(c_fisher(*g_dot_d, dir.norm_sq, 1e-5), 0.0);
        }
    }
}
