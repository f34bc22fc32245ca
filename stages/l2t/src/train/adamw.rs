//! AdamW (Loshchilov & Hutter) with its state in the open, and global gradient-norm clipping.
//! candle's own AdamW hides its moments and has neither clipping nor a schedule (design.md).

use crate::kernels::{
    self,
    fused::{contiguous_f32, contiguous_f32_mut},
};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Gradients aligned with [`AdamW::vars`].
pub type Grads = Vec<Option<Tensor>>;

/// Optimizer over named variables. Weight decay applies to matrices only (not norms or biases).
pub struct AdamW {
    pub vars: Vec<(String, Var)>,
    /// First and second moments, one per variable.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Updates taken so far.
    pub step: usize,
    pub params: AdamWParams,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        // Separate buffers: the step updates them in place.
        let zeros = || vars.iter().map(|(_, v)| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>();
        let (m, v) = (zeros()?, zeros()?);
        Ok(Self { vars, m, v, step: 0, params })
    }

    /// The gradient of each variable, in `vars` order (`None`: the loss does not reach it).
    pub fn grads_of(&self, store: &GradStore) -> Grads {
        self.vars.iter().map(|(_, v)| store.get(v.as_tensor()).cloned()).collect()
    }

    /// Adds one backward pass's gradients into an accumulator (gradient accumulation), in place
    /// for f32 CPU tensors (into a copy of the first pass's gradients, which the store owns).
    pub fn accumulate(&self, acc: &mut Grads, store: &GradStore) -> Result<()> {
        acc.resize(self.vars.len(), None);
        for (slot, g) in acc.iter_mut().zip(self.grads_of(store)) {
            *slot = match (slot.take(), g) {
                (Some(a), Some(g)) if in_place(&a) => {
                    a.inplace_op2(&g, &Fused::AddAssign)?;
                    Some(a)
                }
                (Some(a), Some(g)) => Some((a + g)?),
                (None, Some(g)) if in_place(&g) => Some(g.copy()?),
                (a, g) => a.or(g),
            };
        }
        Ok(())
    }

    /// Global L2 norm of the gradients (variables without a gradient count as zero).
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut total = 0.0f64;
        for g in grads.iter().flatten() {
            total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(total.sqrt())
    }

    /// One update at learning rate `lr`, with gradients scaled by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(Option::as_ref) else { continue };
            let decay = if var.rank() >= 2 { 1.0 - lr * weight_decay } else { 1.0 };
            if in_place(var.as_tensor()) {
                // One pass per buffer, no allocation: the same formulas as below.
                let f = |x: f64| x as f32;
                self.m[i].inplace_op2(g, &Fused::Moment { beta: f(beta1), scale: f(grad_scale), square: false })?;
                self.v[i].inplace_op2(g, &Fused::Moment { beta: f(beta2), scale: f(grad_scale), square: true })?;
                let update = Fused::Update { lr: f(lr), decay: f(decay), bias1: f(bias1), bias2: f(bias2), eps: f(eps) };
                var.as_tensor().inplace_op3(&self.m[i], &self.v[i], &update).with_context(|| format!("updating {name}"))?;
                continue;
            }
            let g = (g * grad_scale)?;
            self.m[i] = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            self.v[i] = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let update = ((&self.m[i] / bias1)? / ((&self.v[i] / bias2)?.sqrt()? + eps)?)?;
            let decayed = (var.as_tensor().detach() * decay)?;
            var.set(&(decayed - (update * lr)?)?).with_context(|| format!("updating {name}"))?;
        }
        Ok(())
    }
}

/// Whether a buffer takes the in-place kernels: f32, on the CPU, contiguous.
fn in_place(t: &Tensor) -> bool {
    kernels::cpu_f32(t) && t.is_contiguous()
}

/// The optimizer's elementwise updates, in place over contiguous f32 CPU buffers.
enum Fused {
    /// dst += g.
    AddAssign,
    /// dst = beta * dst + (1 - beta) * (scale * g), or (scale * g)^2 when `square`.
    Moment { beta: f32, scale: f32, square: bool },
    /// theta = decay * theta - lr * (m / bias1) / (sqrt(v / bias2) + eps).
    Update { lr: f32, decay: f32, bias1: f32, bias2: f32, eps: f32 },
}

impl InplaceOp2 for Fused {
    fn name(&self) -> &'static str {
        "adamw-inplace"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<()> {
        let (dst, g) = (contiguous_f32_mut(dst, dst_l, "adamw")?, contiguous_f32(g, g_l, "adamw")?);
        if dst.len() != g.len() {
            candle_core::bail!("optimizer kernels: {} values and a gradient of {}", dst.len(), g.len());
        }
        match *self {
            Fused::AddAssign => dst.iter_mut().zip(g).for_each(|(a, g)| *a += g),
            Fused::Moment { beta, scale, square } => dst.iter_mut().zip(g).for_each(|(m, &g)| {
                let g = scale * g;
                *m = beta * *m + (1.0 - beta) * if square { g * g } else { g };
            }),
            Fused::Update { .. } => candle_core::bail!("the update reads two moments"),
        }
        Ok(())
    }
}

impl InplaceOp3 for Fused {
    fn name(&self) -> &'static str {
        "adamw-inplace"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let Fused::Update { lr, decay, bias1, bias2, eps } = *self else { candle_core::bail!("only the update reads two moments") };
        let (theta, m, v) = (contiguous_f32_mut(dst, dst_l, "adamw")?, contiguous_f32(m, m_l, "adamw")?, contiguous_f32(v, v_l, "adamw")?);
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("optimizer kernels: {} values, moments of {} and {}", theta.len(), m.len(), v.len());
        }
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            *t = decay * *t - lr * ((m / bias1) / ((v / bias2).sqrt() + eps));
        }
        Ok(())
    }
}

/// Scale that brings a gradient of norm `norm` within `max_norm`.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, the first Adam update is lr * g / (|g| + eps) ~ lr * sign(g).
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, -2.0, 3.0, 0.5], (2, 2), &dev).unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[[2.0f32, -1.0], [0.5, 0.0]], &dev).unwrap()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let params = AdamWParams { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], params).unwrap();
        opt.step(&opt.grads_of(&grads), 0.01, 1.0).unwrap();
        let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // theta * (1 - lr * wd) - lr * sign(g); the zero gradient only decays.
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 3.0 * 0.999 - 0.01, 0.5 * 0.999];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.step, 1);
    }

    #[test]
    fn grad_norm_and_clip() {
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![0.0f32, 0.0], 2, &dev).unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[3.0f32, 4.0], &dev).unwrap()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let opt = AdamW::new(vec![("w".into(), w)], AdamWParams::default()).unwrap();
        assert!((AdamW::grad_norm(&opt.grads_of(&grads)).unwrap() - 5.0).abs() < 1e-6);
        // Accumulating the same backward pass twice doubles the gradient.
        let mut acc = Grads::new();
        opt.accumulate(&mut acc, &grads).unwrap();
        opt.accumulate(&mut acc, &grads).unwrap();
        assert!((AdamW::grad_norm(&acc).unwrap() - 10.0).abs() < 1e-5);
        assert!((clip_scale(5.0, 1.0) - 0.2).abs() < 1e-6);
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
    }

    /// The in-place f32 kernels take the same steps as the composed ops (run here in f64).
    #[test]
    fn in_place_steps_match_the_composed_ones() {
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        let target = Tensor::from_vec((0..12).map(|i| (i as f32 * 1.3).cos()).collect::<Vec<f32>>(), (3, 4), &dev).unwrap();
        let run = |dtype: DType| -> Vec<f32> {
            let w = Var::from_tensor(&Tensor::from_vec(init.clone(), (3, 4), &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWParams { weight_decay: 0.1, ..Default::default() }).unwrap();
            for step in 0..4 {
                let mut acc = Grads::new();
                for _ in 0..2 {
                    let diff = (w.as_tensor() - target.to_dtype(dtype).unwrap()).unwrap();
                    let grads = diff.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    opt.accumulate(&mut acc, &grads).unwrap();
                }
                opt.step(&acc, 0.05, 0.5 + 0.1 * step as f64).unwrap();
            }
            w.as_tensor().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        let (fused, composed) = (run(DType::F32), run(DType::F64));
        for (a, b) in fused.iter().zip(&composed) {
            assert!((a - b).abs() < 1e-5, "{fused:?} vs {composed:?}");
        }
        assert!(fused.iter().zip(&init).any(|(a, b)| (a - b).abs() > 0.05), "the steps moved the weights");
    }
}
