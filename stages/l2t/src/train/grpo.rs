//! The policy update (l2t-spec section 8): clipped surrogate with a k3 KL penalty to the base
//! policy, per-token, aggregated as `loss_agg` says.
//!
//! ```text
//! ratio  = exp(logp_theta - logp_old)
//! loss_t = -min(ratio * A_t, clip(ratio, 1 - eps_low, 1 + eps_high) * A_t) + beta_kl * k3
//! k3     = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1
//! ```
//!
//! Each minibatch is one optimizer step; its sequences go through the model `micro_batch` at a
//! time with gradients accumulated, so backprop never holds more than a few sequences' graphs.

use super::adamw::{clip_scale, AdamW, AdamWParams, Grads};
use super::decoder_pass::{trainable, Batch, GradBuffers, Locked, Params, Tape};
use super::schedule::cosine_lr;
use crate::config::{LossAgg, UpdateConfig};
use crate::model::{Config, TeacherForced, Weights};
use crate::table::update_metrics::StepMetrics;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// `exp(logp - logp_old)`.
pub fn ratio(logp: f64, logp_old: f64) -> f64 {
    (logp - logp_old).exp()
}

/// `k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1` (Schulman's unbiased, positive KL estimate).
pub fn k3(logp_ref: f64, logp: f64) -> f64 {
    let d = logp_ref - logp;
    d.exp() - d - 1.0
}

/// `-min(ratio * a, clip(ratio, 1 - eps_low, 1 + eps_high) * a)`.
pub fn clipped_surrogate(ratio: f64, a: f64, eps_low: f64, eps_high: f64) -> f64 {
    -(ratio * a).min(ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a)
}

/// One response token's loss terms under the update's formula, and the gradient of its loss
/// `pg + beta_kl * k3` with respect to its log-prob: `-A ratio` while the surrogate is not clipped
/// (0 where `min` picks the constant clipped branch), plus `beta_kl (1 - exp(logp_ref - logp))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    pub ratio: f64,
    pub pg: f64,
    pub k3: f64,
    pub clipped: bool,
    pub dloss_dlogp: f64,
}

pub fn token_loss(logp: f64, logp_old: f64, logp_ref: f64, a: f64, u: &UpdateConfig) -> TokenLoss {
    let r = ratio(logp, logp_old);
    let clipped = (r < 1.0 - u.eps_low && a < 0.0) || (r > 1.0 + u.eps_high && a > 0.0);
    let mut dloss_dlogp = if clipped { 0.0 } else { -a * r };
    let mut k3_value = 0.0;
    if u.beta_kl > 0.0 {
        k3_value = k3(logp_ref, logp);
        dloss_dlogp += u.beta_kl * (1.0 - (logp_ref - logp).exp());
    }
    TokenLoss { ratio: r, pg: clipped_surrogate(r, a, u.eps_low, u.eps_high), k3: k3_value, clipped, dloss_dlogp }
}

/// The weight of each token's loss in the minibatch loss, so that `loss = sum_t weight_t * loss_t`.
pub fn token_weights(lens: &[usize], agg: LossAgg, max_new_tokens: usize) -> Vec<Vec<f64>> {
    let n_seq = lens.len().max(1) as f64;
    let total: usize = lens.iter().sum();
    lens.iter()
        .map(|&len| {
            let w = match agg {
                LossAgg::TokenMean => 1.0 / total.max(1) as f64,
                LossAgg::SeqMeanTokenMean => 1.0 / (n_seq * len.max(1) as f64),
                LossAgg::DrGrpo => 1.0 / (n_seq * max_new_tokens.max(1) as f64),
            };
            vec![w; len]
        })
        .collect()
}

/// One sequence of the update batch.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// Sampler log-probs.
    pub logp_old: Vec<f32>,
    /// Base-policy log-probs (unused when `beta_kl = 0`).
    pub logp_ref: Vec<f32>,
    pub a_t: Vec<f32>,
}

/// What an update reads: the `[update]` knobs and the response token budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoParams {
    pub update: UpdateConfig,
    /// Token budget of a response (`sample.max_new_tokens`, the `dr-grpo` normaliser).
    pub max_new_tokens: usize,
}

impl GrpoParams {
    /// Optimizer steps the whole run plans (the cosine schedule's length).
    pub fn planned_steps(&self) -> usize {
        let u = &self.update;
        u.planned_iterations * u.ppo_epochs * u.minibatches
    }
}

/// The loss of one micro batch (already weighted for its minibatch) and its metric sums.
#[derive(Debug, Default)]
struct MicroLoss {
    loss: f64,
    pg: f64,
    kl_loss: f64,
    kl_sum: f64,
    clipped: f64,
    ratio_sum: f64,
}

/// One micro batch through the owned pass ([`decoder_pass`]): the response tokens' log-probs,
/// [`token_loss`] of each, and the gradients of the weighted loss added into `grads`.
fn owned_micro_step(
    cfg: &Config,
    vars: &[(String, Var)],
    seqs: &[&Sequence],
    weights: &[&Vec<f64>],
    p: &GrpoParams,
    grads: &mut GradBuffers,
) -> Result<MicroLoss> {
    let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (s.prompt.as_slice(), s.response.as_slice())).collect();
    let locked = Locked::new(vars);
    let params = Params::new(cfg, &locked)?;
    let tape = Tape::forward(&params, Batch::responses(&pairs)?)?;
    let (mut m, mut dlogp) = (MicroLoss::default(), Vec::with_capacity(tape.logp().len()));
    let mut logp = tape.logp().iter();
    for (s, w) in seqs.iter().zip(weights) {
        for (j, &w) in w.iter().enumerate().take(s.response.len()) {
            let Some(&lp) = logp.next() else { bail!("the pass scored fewer tokens than the responses hold") };
            let reference = if p.update.beta_kl > 0.0 { f64::from(s.logp_ref[j]) } else { 0.0 };
            let t = token_loss(f64::from(lp), f64::from(s.logp_old[j]), reference, f64::from(s.a_t[j]), &p.update);
            m.pg += w * t.pg;
            m.kl_loss += w * p.update.beta_kl * t.k3;
            m.kl_sum += t.k3;
            m.clipped += f64::from(u8::from(t.clipped));
            m.ratio_sum += t.ratio;
            dlogp.push((w * t.dloss_dlogp) as f32);
        }
    }
    m.loss = m.pg + m.kl_loss;
    tape.backward(&dlogp, grads)?;
    Ok(m)
}

fn micro_loss(
    model: &crate::model::Model,
    seqs: &[&Sequence],
    weights: &[&Vec<f64>],
    p: &GrpoParams,
    pad_id: u32,
    dev: &Device,
) -> Result<(Tensor, MicroLoss)> {
    let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (s.prompt.as_slice(), s.response.as_slice())).collect();
    let batch = TeacherForced::new(&pairs, pad_id, dev)?;
    let (b, t) = batch.inputs.dims2()?;
    // Per-position inputs of the formula, zero (and weight zero) outside the responses.
    let (mut old, mut reference, mut adv, mut w) = (vec![0f32; b * t], vec![0f32; b * t], vec![0f32; b * t], vec![0f32; b * t]);
    for (r, s) in seqs.iter().enumerate() {
        let at = r * t + batch.offsets[r];
        for j in 0..s.response.len() {
            old[at + j] = s.logp_old[j];
            reference[at + j] = if p.update.beta_kl > 0.0 { s.logp_ref[j] } else { 0.0 };
            adv[at + j] = s.a_t[j];
            w[at + j] = weights[r][j] as f32;
        }
    }
    let tensor = |v: Vec<f32>| Tensor::from_vec(v, (b, t), dev);
    let (old, reference, adv, w) = (tensor(old)?, tensor(reference)?, tensor(adv)?, tensor(w)?);
    let logp = batch.logprobs(model)?;
    formula_loss(&logp, &old, &reference, &adv, &w, p)
}

/// The formula above on `(B, T)` tensors whose positions outside the responses (prompt, padding)
/// have weight 0 and `old = reference = 0`. The log-ratio to the reference is set to 0 there
/// before the exponential: a prompt or padding token's log-prob can be very negative (or `-inf`),
/// `exp(0 - logp)` then overflows to inf, and inf times a zero weight is NaN in the loss and its
/// gradient.
fn formula_loss(logp: &Tensor, old: &Tensor, reference: &Tensor, adv: &Tensor, w: &Tensor, p: &GrpoParams) -> Result<(Tensor, MicroLoss)> {
    let ratio = (logp - old)?.exp()?;
    let clipped_ratio = ratio.clamp(1.0 - p.update.eps_low, 1.0 + p.update.eps_high)?;
    let pg = (ratio.broadcast_mul(adv)?.minimum(&clipped_ratio.broadcast_mul(adv)?)?).neg()?;
    let pg_loss = (&pg * w)?.sum_all()?;
    let (loss, kl_loss, kl_sum) = if p.update.beta_kl > 0.0 {
        let in_response = w.ne(0f32)?;
        let d = in_response.where_cond(&(reference - logp)?, &reference.zeros_like()?)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        let kl_sum = f64::from(k3.sum_all()?.to_scalar::<f32>()?);
        let kl_loss = ((&k3 * w)?.sum_all()? * p.update.beta_kl)?;
        let kl_value = f64::from(kl_loss.to_scalar::<f32>()?);
        ((&pg_loss + kl_loss)?, kl_value, kl_sum)
    } else {
        (pg_loss.clone(), 0.0, 0.0)
    };
    // Metrics, without gradient.
    let (ratio_v, adv_v, w_v): (Vec<f32>, Vec<f32>, Vec<f32>) =
        (ratio.flatten_all()?.to_vec1()?, adv.flatten_all()?.to_vec1()?, w.flatten_all()?.to_vec1()?);
    let (mut clipped, mut ratio_sum) = (0.0, 0.0);
    for ((&r, &a), &wt) in ratio_v.iter().zip(&adv_v).zip(&w_v) {
        if wt == 0.0 {
            continue;
        }
        let (r, a) = (f64::from(r), f64::from(a));
        ratio_sum += r;
        if (r < 1.0 - p.update.eps_low && a < 0.0) || (r > 1.0 + p.update.eps_high && a > 0.0) {
            clipped += 1.0;
        }
    }
    let value = f64::from(loss.to_scalar::<f32>()?);
    Ok((loss, MicroLoss { pg: f64::from(pg_loss.to_scalar::<f32>()?), loss: value, kl_loss, kl_sum, clipped, ratio_sum }))
}

/// The loss of the whole batch taken as one minibatch, from the policy's log-probs of every
/// response token (`logp[i][t]`), by the scalar formulas above. Evaluated before and after an
/// update, it shows whether the update lowered the loss on a fixed batch.
pub fn batch_loss(seqs: &[Sequence], logp: &[Vec<f32>], p: &GrpoParams) -> f64 {
    let lens: Vec<usize> = seqs.iter().map(|s| s.response.len()).collect();
    let weights = token_weights(&lens, p.update.loss_agg, p.max_new_tokens);
    let mut total = 0.0;
    for ((s, lp), w) in seqs.iter().zip(logp).zip(&weights) {
        for t in 0..s.response.len() {
            let (lp, old) = (f64::from(lp[t]), f64::from(s.logp_old[t]));
            let mut loss_t = clipped_surrogate(ratio(lp, old), f64::from(s.a_t[t]), p.update.eps_low, p.update.eps_high);
            if p.update.beta_kl > 0.0 {
                loss_t += p.update.beta_kl * k3(f64::from(s.logp_ref[t]), lp);
            }
            total += w[t] * loss_t;
        }
    }
    total
}

/// The optimizer's state between iterations.
pub struct OptimizerState {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: usize,
}

/// Runs `ppo_epochs` x `minibatches` optimizer steps on `seqs`, continuing from `state`.
/// Returns the new weights, the optimizer state and one metrics row per step.
#[allow(clippy::too_many_arguments)]
pub fn update(
    cfg: &Config,
    weights: Weights,
    state: Option<OptimizerState>,
    seqs: &[Sequence],
    p: &GrpoParams,
    pad_id: u32,
    rng: &mut ChaCha8Rng,
    dev: &Device,
    mut on_step: impl FnMut(&StepMetrics),
) -> Result<(Weights, OptimizerState, Vec<StepMetrics>)> {
    if seqs.is_empty() {
        bail!("no sequences to train on");
    }
    let (vars, model) = trainable(cfg, weights, dev)?;
    let mut opt = AdamW::new(vars, AdamWParams { weight_decay: p.update.weight_decay, ..AdamWParams::default() })?;
    if let Some(s) = state {
        if s.m.len() != opt.vars.len() || s.v.len() != opt.vars.len() {
            bail!("optimizer state has {} moments but the policy has {} tensors", s.m.len(), opt.vars.len());
        }
        (opt.m, opt.v, opt.step) = (s.m, s.v, s.step);
    }
    let warmup = (p.update.warmup_frac * p.planned_steps() as f64).round() as usize;
    let minibatches = p.update.minibatches.clamp(1, seqs.len());
    let mut log = Vec::new();
    for epoch in 0..p.update.ppo_epochs {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.shuffle(rng);
        for (mb, part) in split_even(&order, minibatches).into_iter().enumerate() {
            let part = &by_prompt(part, seqs);
            let lens: Vec<usize> = part.iter().map(|&i| seqs[i].response.len()).collect();
            let weights = token_weights(&lens, p.update.loss_agg, p.max_new_tokens);
            let mut grads = Grads::new();
            let mut owned_grads = model.is_none().then(|| GradBuffers::zeros(&opt.vars));
            let mut m = StepMetrics { epoch: epoch as u32, minibatch: mb as u32, sequences: part.len() as u32, ..StepMetrics::default() };
            m.tokens = lens.iter().sum::<usize>() as u64;
            let (mut kl_sum, mut clipped, mut ratio_sum) = (0.0, 0.0, 0.0);
            for (chunk, chunk_w) in part.chunks(p.update.micro_batch.max(1)).zip(weights.chunks(p.update.micro_batch.max(1))) {
                let chunk_seqs: Vec<&Sequence> = chunk.iter().map(|&i| &seqs[i]).collect();
                let chunk_w: Vec<&Vec<f64>> = chunk_w.iter().collect();
                let micro = match (&model, owned_grads.as_mut()) {
                    (Some(model), _) => {
                        let (loss, micro) = micro_loss(model, &chunk_seqs, &chunk_w, p, pad_id, dev)?;
                        opt.accumulate(&mut grads, &loss.backward()?)?;
                        micro
                    }
                    (None, Some(buffers)) => owned_micro_step(cfg, &opt.vars, &chunk_seqs, &chunk_w, p, buffers)?,
                    (None, None) => bail!("no model and no gradient buffers"),
                };
                m.loss += micro.loss;
                m.pg_loss += micro.pg;
                m.kl_loss += micro.kl_loss;
                kl_sum += micro.kl_sum;
                clipped += micro.clipped;
                ratio_sum += micro.ratio_sum;
            }
            if let Some(buffers) = owned_grads {
                grads = buffers.into_tensors(&opt.vars)?;
            }
            let tokens = m.tokens.max(1) as f64;
            (m.kl, m.clip_frac, m.ratio_mean) = (kl_sum / tokens, clipped / tokens, ratio_sum / tokens);
            m.grad_norm = AdamW::grad_norm(&grads)?;
            m.tensors_with_grad = grads.iter().flatten().count() as u32;
            if !m.grad_norm.is_finite() || !m.loss.is_finite() {
                bail!("epoch {epoch} minibatch {mb}: the loss or its gradient is not finite (loss {}, grad norm {})", m.loss, m.grad_norm);
            }
            m.lr = cosine_lr(opt.step, p.planned_steps(), warmup, p.update.lr, p.update.min_lr_ratio);
            m.step = opt.step as u64;
            opt.step(&grads, m.lr, clip_scale(m.grad_norm, p.update.max_grad_norm))?;
            on_step(&m);
            log.push(m);
        }
    }
    let state = OptimizerState { m: opt.m, v: opt.v, step: opt.step };
    let trained = opt.vars.into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
    Ok((trained, state, log))
}

/// A minibatch's sequences with those of one prompt next to each other (prompts in order of first
/// appearance), so that a micro batch holds a group's responses together and computes their
/// prompt once ([`Batch::responses`]). The minibatch's gradient is the same sum in another order.
fn by_prompt(part: &[usize], seqs: &[Sequence]) -> Vec<usize> {
    let mut prompts: Vec<&[u32]> = Vec::new();
    let mut keyed: Vec<(usize, usize)> = part
        .iter()
        .map(|&i| {
            let prompt = seqs[i].prompt.as_slice();
            let rank = prompts.iter().position(|&p| p == prompt).unwrap_or_else(|| {
                prompts.push(prompt);
                prompts.len() - 1
            });
            (rank, i)
        })
        .collect();
    keyed.sort_by_key(|&(rank, _)| rank);
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// `items` in `parts` contiguous pieces whose sizes differ by at most one.
fn split_even(items: &[usize], parts: usize) -> Vec<&[usize]> {
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for i in 0..parts {
        let n = base + usize::from(i < extra);
        out.push(&items[at..at + n]);
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build_model, init_weights};

    #[test]
    fn ratio_k3_and_clipped_surrogate_by_hand() {
        assert!((ratio(-1.0, -1.5) - 0.5f64.exp()).abs() < 1e-12);
        // k3(d) = e^d - d - 1: 0 at d = 0; d = ln 2 -> 2 - ln 2 - 1 = 0.306853.
        assert_eq!(k3(-2.0, -2.0), 0.0);
        assert!((k3(2f64.ln() - 1.0, -1.0) - (1.0 - 2f64.ln())).abs() < 1e-12);
        // A > 0: ratio 1.5 is clipped to 1.2 -> -1.2 A; ratio 0.5 is not -> -0.5 A.
        assert!((clipped_surrogate(1.5, 2.0, 0.2, 0.2) + 2.4).abs() < 1e-12);
        assert!((clipped_surrogate(0.5, 2.0, 0.2, 0.2) + 1.0).abs() < 1e-12);
        // A < 0: ratio 0.5 is clipped to 0.8 -> -(0.8 * -1) = 0.8; ratio 1.5 is not -> 1.5.
        assert!((clipped_surrogate(0.5, -1.0, 0.2, 0.2) - 0.8).abs() < 1e-12);
        assert!((clipped_surrogate(1.5, -1.0, 0.2, 0.2) - 1.5).abs() < 1e-12);
    }

    /// One sequence `[prompt, z_1, z_2]` as `formula_loss` sees it: position 0 lies outside the
    /// response (weight 0, `old = reference = 0`) and holds the log-prob `outside`.
    fn loss_with_outside_logp(outside: f32) -> (f64, f64, Vec<f32>) {
        let dev = Device::Cpu;
        let row = |v: [f32; 3]| Tensor::from_vec(v.to_vec(), (1, 3), &dev).unwrap();
        let logp = Var::from_tensor(&row([outside, -1.0, -2.0])).unwrap();
        let (old, reference, adv, w) = (row([0.0, -1.2, -1.9]), row([0.0, -0.8, -2.5]), row([0.0, 1.0, -1.0]), row([0.0, 0.5, 0.5]));
        let (loss, m) = formula_loss(logp.as_tensor(), &old, &reference, &adv, &w, &params()).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = grads.get(logp.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (m.loss, m.kl_sum, g)
    }

    #[test]
    fn an_extreme_log_prob_outside_the_response_leaves_the_loss_alone() {
        // Before masking, -1e4 gave k3 = exp(1e4) - ... = inf at weight 0, so a NaN loss.
        let (loss, kl_sum, grad) = loss_with_outside_logp(-1.0);
        // By hand (beta_kl = 0.1, weights 0.5):
        //   z_1: ratio e^0.2 = 1.2214 > 1.2, A = 1 -> pg = -1.2;  k3(0.2) = e^0.2 - 1.2 = 0.021403
        //   z_2: ratio e^-0.1 = 0.9048, A = -1 -> pg = 0.9048;    k3(-0.5) = e^-0.5 - 0.5 = 0.106531
        let (k1, k2) = (0.2f64.exp() - 1.2, (-0.5f64).exp() - 0.5);
        let by_hand = 0.5 * (-1.2 + (-0.1f64).exp()) + 0.1 * 0.5 * (k1 + k2);
        assert!((loss - by_hand).abs() < 1e-6, "{loss} vs {by_hand}");
        assert!((kl_sum - (k1 + k2)).abs() < 1e-6);
        for outside in [-100.0, -1e4, f32::NEG_INFINITY] {
            let (l, k, g) = loss_with_outside_logp(outside);
            assert_eq!((l, k), (loss, kl_sum), "log-prob {outside} outside the response");
            assert_eq!(g, grad, "log-prob {outside}: gradient");
            assert_eq!(g[0], 0.0);
        }
    }

    /// The owned pass's per-token loss and its gradient are the tensor formula's (autograd), on
    /// and off the clipped branches.
    #[test]
    fn token_loss_matches_the_tensor_formula_and_its_gradient() {
        let dev = Device::Cpu;
        let p = params();
        assert!(p.update.beta_kl > 0.0);
        // (logp, old, reference, A): inside the clip range; ratio e^1 with A > 0 (clipped, no
        // gradient but the KL's); ratio e^-2 with A < 0 (clipped) and with A > 0 (not clipped).
        let cases =
            [(-1.0, -1.2, -0.8, 1.0), (-2.0, -1.9, -2.5, -1.0), (-0.5, -1.5, -0.4, 2.0), (-3.0, -1.0, -2.0, -1.5), (-3.0, -1.0, -2.0, 1.5)];
        for (lp, old, reference, a) in cases {
            let one = |v: f32| Tensor::from_vec(vec![v], (1, 1), &dev).unwrap();
            let logp = Var::from_tensor(&one(lp)).unwrap();
            let (loss, m) = formula_loss(logp.as_tensor(), &one(old), &one(reference), &one(a), &one(1.0), &p).unwrap();
            let g = loss.backward().unwrap().get(logp.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let t = token_loss(f64::from(lp), f64::from(old), f64::from(reference), f64::from(a), &p.update);
            assert!((t.pg + p.update.beta_kl * t.k3 - m.loss).abs() < 1e-5, "{lp} {old} {reference} {a}: loss {t:?} vs {}", m.loss);
            assert!((t.dloss_dlogp - f64::from(g)).abs() < 1e-5, "{lp} {old} {reference} {a}: gradient {} vs {g}", t.dloss_dlogp);
            assert_eq!(t.clipped, m.clipped == 1.0);
        }
    }

    #[test]
    fn a_minibatch_keeps_each_prompts_sequences_together() {
        let seq = |prompt: u32| Sequence { prompt: vec![prompt], response: vec![1], logp_old: vec![0.0], logp_ref: vec![], a_t: vec![0.0] };
        let seqs = [seq(7), seq(8), seq(7), seq(9), seq(8)];
        assert_eq!(by_prompt(&[4, 0, 1, 2, 3], &seqs), [4, 1, 0, 2, 3]);
    }

    #[test]
    fn each_loss_aggregation_by_hand() {
        // Two sequences of 1 and 3 tokens with token losses [4] and [1, 2, 3].
        let losses = [vec![4.0], vec![1.0, 2.0, 3.0]];
        let agg = |a: LossAgg| -> f64 {
            let w = token_weights(&[1, 3], a, 10);
            w.iter().zip(&losses).flat_map(|(w, l)| w.iter().zip(l).map(|(w, l)| w * l)).sum()
        };
        // token-mean: (4 + 1 + 2 + 3) / 4 = 2.5
        assert!((agg(LossAgg::TokenMean) - 2.5).abs() < 1e-12);
        // seq-mean-token-mean: (4 / 1 + 6 / 3) / 2 = 3
        assert!((agg(LossAgg::SeqMeanTokenMean) - 3.0).abs() < 1e-12);
        // dr-grpo: 10 / (2 * 10) = 0.5
        assert!((agg(LossAgg::DrGrpo) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn split_even_covers_every_item() {
        let items: Vec<usize> = (0..7).collect();
        let parts = split_even(&items, 3);
        assert_eq!(parts, vec![&[0, 1, 2][..], &[3, 4], &[5, 6]]);
    }

    fn small() -> (Config, Weights) {
        let cfg = crate::model::test_config(16, 32, 1, 2, 1);
        let w = init_weights(&cfg, 4, &Device::Cpu).unwrap();
        (cfg, w)
    }

    fn params() -> GrpoParams {
        let update = UpdateConfig {
            lr: 1e-2,
            warmup_frac: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1e9,
            eps_low: 0.2,
            eps_high: 0.2,
            beta_kl: 0.1,
            loss_agg: LossAgg::TokenMean,
            ppo_epochs: 1,
            minibatches: 1,
            micro_batch: 1,
            planned_iterations: 10,
            min_lr_ratio: 0.0,
            ..UpdateConfig::default()
        };
        GrpoParams { update, max_new_tokens: 8 }
    }

    /// Two sequences whose sampler log-probs are away from the policy's, so that the clip is
    /// active on some tokens, with the KL term on.
    fn two_sequences() -> [Sequence; 2] {
        let seq = |prompt: &[u32], response: &[u32], logp_old: &[f32], logp_ref: &[f32], a_t: &[f32]| Sequence {
            prompt: prompt.to_vec(),
            response: response.to_vec(),
            logp_old: logp_old.to_vec(),
            logp_ref: logp_ref.to_vec(),
            a_t: a_t.to_vec(),
        };
        [
            seq(&[3, 4], &[5, 6, 7], &[-5.5, -5.9, -5.2], &[-5.6, -5.8, -5.7], &[1.0, -0.5, 2.0]),
            seq(&[9], &[10, 11], &[-5.7, -5.6], &[-5.7, -5.6], &[-1.0, 0.7]),
        ]
    }

    /// The loss's gradient along one weight equals a central finite difference of the loss, with
    /// ratios away from 1 so that the clip is active on some tokens, and the KL term on.
    #[test]
    fn grpo_loss_gradient_matches_finite_difference() {
        let (cfg, weights) = small();
        let dev = Device::Cpu;
        let seqs = two_sequences();
        let p = params();
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let w = token_weights(&[3, 2], p.update.loss_agg, p.max_new_tokens);
        let wr: Vec<&Vec<f64>> = w.iter().collect();
        let loss_at = |weights: &Weights| -> f64 {
            let model = build_model(&cfg, weights, &dev).unwrap();
            micro_loss(&model, &refs, &wr, &p, 0, &dev).unwrap().1.loss
        };
        let name = "model.layers.0.mlp.up_proj.weight";
        let var = Var::from_tensor(&weights[name]).unwrap();
        let mut with_var = weights.clone();
        with_var.insert(name.into(), var.as_tensor().clone());
        let model = build_model(&cfg, &with_var, &dev).unwrap();
        let grads = micro_loss(&model, &refs, &wr, &p, 0, &dev).unwrap().0.backward().unwrap();
        let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Perturb the entries with the largest gradients.
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let base: Vec<f32> = weights[name].flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-2f32;
        for &i in idx.iter().take(3) {
            let shifted = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                let mut w = weights.clone();
                w.insert(name.into(), Tensor::from_vec(v, weights[name].dims(), &dev).unwrap());
                loss_at(&w)
            };
            let fd = (shifted(h) - shifted(-h)) / (2.0 * f64::from(h));
            let rel = (fd - f64::from(g[i])).abs() / f64::from(g[i]).abs();
            assert!(rel < 2e-2, "entry {i}: fd {fd} vs backprop {}", g[i]);
        }
    }

    #[test]
    fn updates_raise_the_likelihood_of_positive_advantage_tokens() {
        let (cfg, weights) = small();
        let dev = Device::Cpu;
        let model = build_model(&cfg, &weights, &dev).unwrap();
        let pairs: Vec<(&[u32], &[u32])> = vec![(&[3, 4], &[5, 6]), (&[3, 4], &[7, 8])];
        let logp = crate::model::response_logprobs(&model, &pairs, 0, 2).unwrap();
        let seqs: Vec<Sequence> = pairs
            .iter()
            .zip(&logp)
            .zip([1.0f32, -1.0])
            .map(|(((p, z), lp), a)| Sequence {
                prompt: p.to_vec(),
                response: z.to_vec(),
                logp_old: lp.clone(),
                logp_ref: lp.clone(),
                a_t: vec![a; 2],
            })
            .collect();
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let mut p = params();
        p.update.ppo_epochs = 4;
        let before = batch_loss(&seqs, &logp, &p);
        let (trained, state, log) = update(&cfg, weights, None, &seqs, &p, 0, &mut rng, &dev, |_| {}).unwrap();
        let after_logp = crate::model::response_logprobs(&build_model(&cfg, &trained, &dev).unwrap(), &pairs, 0, 2).unwrap();
        let after = batch_loss(&seqs, &after_logp, &p);
        assert!(after < before, "the loss on the batch went from {before} to {after}");
        // The scalar formula agrees with the tensor loss the update differentiates.
        let w = token_weights(&[2, 2], p.update.loss_agg, p.max_new_tokens);
        let (_, tensor_loss) = micro_loss(&model, &seqs.iter().collect::<Vec<_>>(), &w.iter().collect::<Vec<_>>(), &p, 0, &dev).unwrap();
        assert!((tensor_loss.loss - before).abs() < 1e-5);
        assert_eq!(state.step, 4);
        assert_eq!(log.len(), 4);
        let sum = |v: &Vec<f32>| v.iter().sum::<f32>();
        assert!(sum(&after_logp[0]) > sum(&logp[0]), "positive advantage: {:?} -> {:?}", logp[0], after_logp[0]);
        assert!(sum(&after_logp[1]) < sum(&logp[1]), "negative advantage: {:?} -> {:?}", logp[1], after_logp[1]);
        assert!(log[0].clip_frac == 0.0 && (log[0].ratio_mean - 1.0).abs() < 1e-5, "{:?}", log[0]);
    }

    /// One whole update (two AdamW steps, clipping and the KL term on) on the device-generic path
    /// (composed ops, autograd and the composed AdamW, what CUDA runs) gives the weights of the CPU
    /// path (the owned training pass and the in-place AdamW).
    #[test]
    fn an_update_on_the_generic_path_matches_the_cpu_kernels() {
        let (cfg, weights) = small();
        let dev = Device::Cpu;
        let seqs = two_sequences();
        let mut p = params();
        (p.update.ppo_epochs, p.update.weight_decay) = (2, 0.01);
        let train = || {
            let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
            update(&cfg, weights.clone(), None, &seqs, &p, 0, &mut rng, &dev, |_| {}).unwrap()
        };
        let (fast, fast_state, fast_log) = train();
        let (generic, generic_state, generic_log) = crate::kernels::generic(train);
        assert_eq!((fast_state.step, fast_log.len()), (generic_state.step, generic_log.len()));
        for (a, b) in fast_log.iter().zip(&generic_log) {
            assert!((a.loss - b.loss).abs() < 1e-5 * a.loss.abs().max(1.0), "loss {} vs {}", a.loss, b.loss);
        }
        // Mean absolute differences: Adam's first steps move a weight by about lr whatever its
        // gradient's size, so a gradient within rounding of 0 may move either way on either path.
        let mean_abs = |t: Tensor| t.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        for (name, w) in &fast {
            let moved = mean_abs((w - &weights[name]).unwrap());
            let diff = mean_abs((w - &generic[name]).unwrap());
            assert!(diff <= 1e-3 * moved + 1e-7, "{name}: the paths' weights differ by {diff} on average (the update moved them {moved})");
        }
    }
}
