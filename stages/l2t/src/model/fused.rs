//! Gradient-free kernels over contiguous f32 tensors (sampling and scoring) on the vectorised
//! exponential: softmax over the last dimension and the MLP's silu(gate) * up. Other dtypes take
//! candle's own ops.

use super::vexp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows handed to one parallel task at least (small rows are not worth a task each).
const MIN_TASK_VALUES: usize = 1 << 14;

/// Softmax over the last dimension (no gradient).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    x.contiguous()?.apply_op1_no_bwd(&Softmax)
}

/// silu(gate) * up (no gradient).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 || !gate.device().is_cpu() || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &SwiGlu)
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{op}: f32 input expected") };
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("{op}: contiguous input expected") };
    Ok(&data[start..end])
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let width = layout.shape().dim(D::Minus1)?.max(1);
        let mut y = x.to_vec();
        let rows_per_task = (MIN_TASK_VALUES / width).max(1);
        y.par_chunks_mut(rows_per_task * width).for_each(|rows| rows.chunks_mut(width).for_each(vexp::softmax_in_place));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, gate: &CpuStorage, gate_layout: &Layout, up: &CpuStorage, up_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = contiguous_f32(gate, gate_layout, self.name())?.to_vec();
        let up = contiguous_f32(up, up_layout, self.name())?;
        y.par_chunks_mut(MIN_TASK_VALUES).zip(up.par_chunks(MIN_TASK_VALUES)).for_each(|(g, u)| vexp::swiglu_in_place(g, u));
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused kernels agree with candle's composed ops on tensors wider than one task.
    #[test]
    fn fused_kernels_match_candle() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (3, 40, 300), &dev).unwrap()).contiguous().unwrap();
        let y = Tensor::randn(0f32, 1.0, (3, 40, 300), &dev).unwrap();
        let max_diff = |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max_diff(softmax_last_dim(&x).unwrap(), candle_nn::ops::softmax(&x, D::Minus1).unwrap()) < 1e-6);
        assert!(max_diff(swiglu(&x, &y).unwrap(), (x.silu().unwrap() * &y).unwrap()) < 1e-5);
    }
}
