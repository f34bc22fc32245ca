//! AdamW (Loshchilov & Hutter) with its state in the open, and global gradient-norm clipping.
//! candle's own AdamW hides its moments and has neither clipping nor a schedule (design.md).

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

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
        let m = vars.iter().map(|(_, v)| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self { vars, m, v, step: 0, params })
    }

    /// The gradient of each variable, in `vars` order (`None`: the loss does not reach it).
    pub fn grads_of(&self, store: &GradStore) -> Grads {
        self.vars.iter().map(|(_, v)| store.get(v.as_tensor()).cloned()).collect()
    }

    /// Adds one backward pass's gradients into an accumulator (gradient accumulation).
    pub fn accumulate(&self, acc: &mut Grads, store: &GradStore) -> Result<()> {
        acc.resize(self.vars.len(), None);
        for (slot, g) in acc.iter_mut().zip(self.grads_of(store)) {
            *slot = match (slot.take(), g) {
                (Some(a), Some(g)) => Some((a + g)?),
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
            let g = (g * grad_scale)?;
            self.m[i] = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            self.v[i] = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let update = ((&self.m[i] / bias1)? / ((&self.v[i] / bias2)?.sqrt()? + eps)?)?;
            let theta = var.as_tensor().detach();
            let decayed = if var.rank() >= 2 { (&theta * (1.0 - lr * weight_decay))? } else { theta };
            var.set(&(decayed - (update * lr)?)?).with_context(|| format!("updating {name}"))?;
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
    use candle_core::Device;

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
}
