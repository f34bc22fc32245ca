//! Supervised fine-tuning on worked solutions: the warm-up that makes the tiny base policy.
//! Loss: mean negative log-likelihood of the completion tokens (the prompt is context only).

use super::adamw::{clip_scale, AdamW, AdamWParams};
use super::decoder_pass::{trainable, Batch, GradBuffers, Locked, Params, Tape};
use super::schedule::cosine_lr;
use crate::model::qwen2::causal_mask;
use crate::model::{token_logprobs, Config, Weights};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A training sequence: prompt tokens then completion tokens (ending with end-of-sequence).
#[derive(Debug, Clone)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct SftParams {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_frac: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
}

/// One optimizer step's figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// Builds the inputs of one batch: right-padded input ids (b, t), targets (b, t) and a loss mask
/// (b, t) that is 1 on completion targets.
pub fn batch_tensors(examples: &[&Example], pad_id: u32, dev: &Device) -> Result<(Tensor, Tensor, Tensor, usize)> {
    let t = examples.iter().map(|e| e.prompt.len() + e.completion.len() - 1).max().unwrap_or(1);
    let b = examples.len();
    let (mut inputs, mut targets, mut mask) = (vec![pad_id; b * t], vec![pad_id; b * t], vec![0f32; b * t]);
    let mut n_targets = 0;
    for (r, e) in examples.iter().enumerate() {
        let seq: Vec<u32> = e.prompt.iter().chain(&e.completion).copied().collect();
        for j in 0..seq.len() - 1 {
            inputs[r * t + j] = seq[j];
            targets[r * t + j] = seq[j + 1];
            if j + 1 >= e.prompt.len() {
                mask[r * t + j] = 1.0;
                n_targets += 1;
            }
        }
    }
    Ok((Tensor::from_vec(inputs, (b, t), dev)?, Tensor::from_vec(targets, (b, t), dev)?, Tensor::from_vec(mask, (b, t), dev)?, n_targets))
}

/// Trains `weights` on `examples`; returns the trained weights and the step log.
pub fn train(
    cfg: &Config,
    weights: Weights,
    examples: &[Example],
    pad_id: u32,
    params: &SftParams,
    dev: &Device,
    on_step: impl FnMut(&StepLog),
) -> Result<(Weights, Vec<StepLog>)> {
    train_micro(cfg, weights, examples, pad_id, params, params.batch_size, dev, on_step)
}

/// [`train`] with each batch processed `micro_batch` examples per forward/backward pass and the
/// gradients accumulated: the same update, with the activations of fewer sequences alive at once.
#[allow(clippy::too_many_arguments)]
pub fn train_micro(
    cfg: &Config,
    weights: Weights,
    examples: &[Example],
    pad_id: u32,
    params: &SftParams,
    micro_batch: usize,
    dev: &Device,
    mut on_step: impl FnMut(&StepLog),
) -> Result<(Weights, Vec<StepLog>)> {
    let (vars, model) = trainable(cfg, weights, dev)?;
    let adam = AdamWParams { weight_decay: params.weight_decay, ..AdamWParams::default() };
    let mut opt = AdamW::new(vars, adam)?;
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed ^ 0x0073_6674); // "sft"
    let warmup = (params.warmup_frac * params.steps as f64).round() as usize;
    let mut log = Vec::with_capacity(params.steps);
    for step in 0..params.steps {
        let batch: Vec<&Example> = (0..params.batch_size).map(|_| &examples[rng.random_range(0..examples.len())]).collect();
        let n_targets = batch.iter().map(|e| e.completion.len()).sum::<usize>().max(1);
        let (mut grads, mut loss_sum, mut tokens) = (Vec::new(), 0f64, 0usize);
        match &model {
            None => {
                let mut buffers = GradBuffers::zeros(&opt.vars);
                for chunk in batch.chunks(micro_batch.max(1)) {
                    let pairs: Vec<(&[u32], &[u32])> = chunk.iter().map(|e| (e.prompt.as_slice(), e.completion.as_slice())).collect();
                    let rows = Batch::responses(&pairs)?;
                    tokens += rows.tokens.len();
                    let locked = Locked::new(&opt.vars);
                    let params = Params::new(cfg, &locked)?;
                    let tape = Tape::forward(&params, rows)?;
                    // loss = -sum(logp) / n_targets.
                    loss_sum -= tape.logp().iter().map(|&lp| f64::from(lp)).sum::<f64>() / n_targets as f64;
                    let dlogp = vec![-1.0 / n_targets as f32; tape.logp().len()];
                    tape.backward(&dlogp, &mut buffers)?;
                }
                grads = buffers.into_tensors(&opt.vars)?;
            }
            Some(model) => {
                for chunk in batch.chunks(micro_batch.max(1)) {
                    let (inputs, targets, mask, _) = batch_tensors(chunk, pad_id, dev)?;
                    let (b, t) = inputs.dims2()?;
                    let positions = Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.expand((b, t))?.contiguous()?;
                    let logits = model.forward(&inputs, &positions, &causal_mask(b, t, dev)?, None)?;
                    let nll = (token_logprobs(&logits, &targets)? * mask)?.sum_all()?.neg()?;
                    let loss = (nll / n_targets as f64)?;
                    opt.accumulate(&mut grads, &loss.backward()?)?;
                    loss_sum += f64::from(loss.to_scalar::<f32>()?);
                    tokens += b * t;
                }
            }
        }
        let grad_norm = AdamW::grad_norm(&grads)?;
        let lr = cosine_lr(step, params.steps, warmup, params.lr, 0.1);
        opt.step(&grads, lr, clip_scale(grad_norm, params.max_grad_norm))?;
        let entry = StepLog { step, loss: loss_sum, lr, grad_norm, tokens };
        on_step(&entry);
        log.push(entry);
    }
    let trained = opt.vars.into_iter().map(|(k, v)| (k, v.as_tensor().detach())).collect();
    Ok((trained, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels;
    use crate::model::init_weights;

    #[test]
    fn batch_masks_only_completion_targets() {
        let e = Example { prompt: vec![1, 2, 3], completion: vec![4, 5] };
        let short = Example { prompt: vec![7], completion: vec![8] };
        let (inputs, targets, mask, n) = batch_tensors(&[&e, &short], 0, &Device::Cpu).unwrap();
        assert_eq!(inputs.to_vec2::<u32>().unwrap(), [[1, 2, 3, 4], [7, 0, 0, 0]]);
        assert_eq!(targets.to_vec2::<u32>().unwrap(), [[2, 3, 4, 5], [8, 0, 0, 0]]);
        assert_eq!(mask.to_vec2::<f32>().unwrap(), [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]);
        assert_eq!(n, 3);
    }

    #[test]
    fn training_lowers_the_loss_on_a_memorisable_set() {
        let cfg = crate::model::test_config(32, 64, 1, 2, 1);
        let dev = Device::Cpu;
        let examples = vec![
            Example { prompt: vec![10, 11], completion: vec![12, 13, 14, 0] },
            Example { prompt: vec![20, 21], completion: vec![22, 23, 24, 0] },
        ];
        let params = SftParams { steps: 60, batch_size: 2, lr: 1e-2, warmup_frac: 0.1, weight_decay: 0.0, max_grad_norm: 1.0, seed: 0 };
        let (_, log) = train(&cfg, init_weights(&cfg, 0, &dev).unwrap(), &examples, 0, &params, &dev, |_| {}).unwrap();
        let (first, last) = (log[0].loss, log.last().unwrap().loss);
        assert!(last < first * 0.2, "loss {first} -> {last}");
    }

    /// The owned pass (f32 on the CPU) and candle's autograd over the composed ops (the path a
    /// GPU runs) take the same steps: the same losses, gradient norms and weights.
    #[test]
    fn the_owned_pass_trains_as_autograd_does() {
        let cfg = crate::model::test_config(32, 64, 2, 4, 2);
        let dev = Device::Cpu;
        let examples = vec![
            Example { prompt: vec![10, 11], completion: vec![12, 13, 14, 0] },
            Example { prompt: vec![20], completion: vec![22, 23, 0] },
            Example { prompt: vec![30, 31, 32], completion: vec![33, 0] },
        ];
        let params = SftParams { steps: 3, batch_size: 3, lr: 1e-2, warmup_frac: 0.0, weight_decay: 0.01, max_grad_norm: 1.0, seed: 0 };
        let run = || train_micro(&cfg, init_weights(&cfg, 0, &dev).unwrap(), &examples, 0, &params, 2, &dev, |_| {}).unwrap();
        let (owned, owned_log) = run();
        let (generic, generic_log) = kernels::generic(run);
        for (a, b) in owned_log.iter().zip(&generic_log) {
            assert!((a.loss - b.loss).abs() < 1e-5 * a.loss.abs(), "loss {} vs {}", a.loss, b.loss);
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm, "grad norm {} vs {}", a.grad_norm, b.grad_norm);
        }
        for (name, w) in &owned {
            let diff = (w - &generic[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{name}: the paths' weights differ by {diff}");
        }
    }
}
