//! A Qwen2-family decoder (Qwen2 with q/k/v bias; Llama / SmolLM without; Qwen3 with q/k norm),
//! after `candle-transformers/src/models/qwen2.rs`. In f32 on the CPU, RMS norm, rotary
//! embedding, softmax and the gated MLP activation run as our fused kernels, which carry their
//! own backward passes (candle's fused kernels drop gradients, design.md "candle cautions");
//! other dtypes (the penalty's f64 tail) take the composed ops. Without gradients (sampling,
//! scoring) the projections run packed, once [`Model::pack_for_inference`] has run.
//!
//! Every forward takes explicit per-row positions and an additive attention mask, so one batch can
//! hold prompts of different lengths (left padding) and decode from a KV cache.

use crate::kernels::{
    self,
    attention::{self, MASKED},
    fused,
    packed::{PackedLinear, PackedSwiGlu},
};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The model families this decoder implements (`model_type` in config.json).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["qwen2", "llama", "qwen3"];

/// Longest rotary table built up front; longer contexts are refused rather than allocated.
pub(crate) const MAX_ROTARY_POSITIONS: usize = 32_768;

/// A token id or a list of them (`eos_token_id` is either in Hugging Face configs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// config.json, with its own keys. Keys this decoder does not read are kept in `extra`, so a
/// checkpoint written back carries them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width when it is not hidden_size / heads (Qwen3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v; absent means the family's default (Qwen2 has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "default_dtype")]
    pub torch_dtype: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_dtype() -> String {
    "float32".into()
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Qwen2 has biases on q/k/v; the Llama family and Qwen3 have none unless the config says so.
    pub fn attention_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// Qwen3 normalises each query and key head (RMS norm over head_dim) before rotary.
    pub fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }

    /// Refuses configs this decoder would misread: another family, rope scaling, inconsistent
    /// head counts.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(format!("model_type {:?} is not supported (supported: {})", self.model_type, SUPPORTED_MODEL_TYPES.join(", ")));
        }
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.num_hidden_layers == 0
            || self.num_attention_heads == 0
            || self.num_key_value_heads == 0
        {
            return Err("vocab_size, hidden_size, num_hidden_layers and the head counts must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported (only plain rotary embeddings)".into());
        }
        if let Some(rope) = self.extra.get("rope_parameters") {
            let kind = rope.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default");
            if kind != "default" {
                return Err(format!("rope_parameters.rope_type {kind:?} is not supported (only plain rotary embeddings)"));
            }
        }
        if self.extra.get("mlp_bias").is_some_and(|b| b.as_bool() == Some(true)) {
            return Err("mlp_bias = true is not supported".into());
        }
        Ok(())
    }

    /// Reads the rotary base from `rope_parameters` (transformers >= 5 writes it there instead of
    /// a top-level `rope_theta`).
    pub fn resolve_rope_theta(&mut self) {
        if let Some(theta) = self.extra.get("rope_parameters").and_then(|r| r.get("rope_theta")).and_then(|t| t.as_f64()) {
            self.rope_theta = theta;
        }
    }

    /// Token ids that end a response: config.json's `eos_token_id` (one or several).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::ids).unwrap_or_default()
    }

    /// Name and shape of every weight, in checkpoint naming.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (name, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                shapes.push((format!("{p}.self_attn.{name}.weight"), vec![out, h]));
                if self.attention_bias() {
                    shapes.push((format!("{p}.self_attn.{name}.bias"), vec![out]));
                }
            }
            if self.qk_norm() {
                shapes.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
                shapes.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
            }
            shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        shapes.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        shapes
    }
}

/// `x W^T (+ b)` as one matrix product over every leading position: candle's `Linear` runs one
/// product per batch row (with M = t, a matrix-vector product per row when decoding) and repacks
/// the weights for each.
fn matmul_t(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (lead, n_in) = dims.split_at(dims.len() - 1);
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, n_in[0]))?.matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut shape = lead.to_vec();
    shape.push(w.dim(0)?);
    y.reshape(shape)
}

/// Whether the fused, gradient-free kernels may run: no operand tracks gradients.
fn gradient_free(tensors: &[&Tensor]) -> bool {
    !tensors.iter().any(|t| t.track_op())
}

/// One projection `x W^T (+ b)`, W (out, in); an inference model also holds W packed.
#[derive(Debug, Clone)]
struct Proj {
    weight: Tensor,
    bias: Option<Tensor>,
    packed: Option<Arc<PackedLinear>>,
}

impl Proj {
    fn new(n_in: usize, n_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bias = if bias { Some(vb.get(n_out, "bias")?) } else { None };
        Ok(Self { weight: vb.get((n_out, n_in), "weight")?, bias, packed: None })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.packed {
            Some(packed) if gradient_free(&[x]) => packed.forward(x),
            _ => matmul_t(x, &self.weight, self.bias.as_ref()),
        }
    }

    /// `residual + self.forward(x)`: a packed product adds the residual as it stores its outputs.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.packed {
            Some(packed) if gradient_free(&[x, residual]) && kernels::cpu_f32(residual) => packed.forward_residual(x, residual),
            _ => residual + self.forward(x)?,
        }
    }

    /// Whether the weights are those of an f32 CPU model that will not be trained: the ones
    /// [`Self::pack`] packs. Asked on the thread that runs the model (see [`kernels::generic`]).
    fn packable(&self) -> bool {
        kernels::cpu_f32(&self.weight) && gradient_free(&[&self.weight])
    }

    fn pack(&mut self) -> Result<()> {
        self.packed = Some(Arc::new(PackedLinear::new(&self.weight, self.bias.as_ref())?));
        Ok(())
    }
}

/// One packing of [`Model::pack_for_inference`]: a projection, or projections of one input
/// stacked into the slot that holds their product.
enum Packing<'a> {
    One(&'a mut Proj),
    Stacked(&'a mut Option<Arc<PackedLinear>>, Vec<&'a Proj>),
    /// An MLP's gate and up projections, as the gated product of [`PackedSwiGlu`].
    Gated(&'a mut Option<Arc<PackedSwiGlu>>, [&'a Proj; 2]),
}

impl Packing<'_> {
    fn packable(&self) -> bool {
        match self {
            Packing::One(proj) => proj.packable(),
            Packing::Stacked(_, parts) => parts.iter().all(|proj| proj.packable()),
            Packing::Gated(_, parts) => parts.iter().all(|proj| proj.packable() && proj.bias.is_none()),
        }
    }

    fn run(self) -> Result<()> {
        match self {
            Packing::One(proj) => proj.pack(),
            Packing::Stacked(slot, parts) => {
                let parts: Vec<(&Tensor, Option<&Tensor>)> = parts.iter().map(|p| (&p.weight, p.bias.as_ref())).collect();
                *slot = Some(Arc::new(PackedLinear::stacked(&parts)?));
                Ok(())
            }
            Packing::Gated(slot, [gate, up]) => {
                *slot = Some(Arc::new(PackedSwiGlu::new(&gate.weight, &up.weight)?));
                Ok(())
            }
        }
    }
}

/// RMS norm (`candle_nn::RmsNorm::forward` may take candle's fused path, which drops gradients).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::cpu_f32(x) {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        // Half precision normalises in f32, as transformers does.
        let (dtype, x) = (x.dtype(), widen(x)?);
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }

    /// The norm and its tangent along `dx`: with `r = 1 / sqrt(mean(x^2) + eps)`,
    /// `d(x r w) = w r (dx - x r^2 mean(x dx))`.
    fn jvp(&self, x: &Tensor, dx: &Tensor) -> Result<Dual> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let along = (x * dx)?.mean_keepdim(D::Minus1)?.broadcast_mul(&r.sqr()?)?;
        let dy = (dx - x.broadcast_mul(&along)?)?.broadcast_mul(&r)?.broadcast_mul(&self.weight)?;
        Ok((self.forward(x)?, dy))
    }
}

/// A value and its tangent: forward-mode differentiation along one direction of the weights
/// (the penalty's `jvp` estimator, [`Model::jvp_target_logprobs`]).
type Dual = (Tensor, Tensor);

/// The gated MLP `down(silu(gate h) * up h)` and its tangent, for a tangent of the input `dh`
/// and tangents of the weights `dw` (gate, up, down), either absent when zero. With
/// `s = sigmoid(g)`, `silu'(g) = s (1 + g (1 - s))`.
fn mlp_jvp(w: [&Tensor; 3], h: &Tensor, dh: Option<&Tensor>, dw: Option<[&Tensor; 3]>) -> Result<Dual> {
    let [wg, wu, wd] = w;
    // The tangent of `h W_m^T`: `dh W_m^T + h dW_m^T`, each term present when its tangent is.
    let tangent = |m: usize, wm: &Tensor| -> Result<Option<Tensor>> {
        let from_input = dh.map(|dh| matmul_t(dh, wm, None)).transpose()?;
        let from_weight = dw.map(|dw| matmul_t(h, dw[m], None)).transpose()?;
        Ok(match (from_input, from_weight) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        })
    };
    let (g, u) = (matmul_t(h, wg, None)?, matmul_t(h, wu, None)?);
    let (dg, du) = (tangent(0, wg)?, tangent(1, wu)?);
    let s = (g.neg()?.exp()? + 1.0)?.recip()?;
    let silu = (&g * &s)?;
    let a = (&silu * &u)?;
    let mut da = match du {
        Some(du) => (&silu * du)?,
        None => a.zeros_like()?,
    };
    if let Some(dg) = dg {
        let slope = (&s * ((&g * (1.0 - &s)?)? + 1.0)?)?;
        da = (da + ((slope * dg)? * &u)?)?;
    }
    let y = matmul_t(&a, wd, None)?;
    let mut dy = matmul_t(&da, wd, None)?;
    if let Some(dw) = dw {
        dy = (dy + matmul_t(&a, dw[2], None)?)?;
    }
    Ok((y, dy))
}

/// Whether a dtype is a half-precision float (bf16, f16).
fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// `x` in f32 if it is in half precision (where a softmax, a norm or the logits are computed),
/// else `x` itself.
fn widen(x: &Tensor) -> Result<Tensor> {
    if is_half(x.dtype()) {
        x.to_dtype(DType::F32)
    } else {
        Ok(x.clone())
    }
}

/// Rotary embedding tables, gathered per row position (the composed form of `rope`).
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Config, dtype: DType, dev: &Device) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64) as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), dev)?;
        let n = cfg.max_position_embeddings.min(MAX_ROTARY_POSITIONS);
        let t = Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)?;
        let freqs = t.reshape((n, 1))?.broadcast_mul(&inv_freq)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// x: (b, heads, t, head_dim); positions: (b, t) u32.
    fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, _heads, t, head_dim) = x.dims4()?;
        let half = head_dim / 2;
        let flat = positions.flatten_all()?;
        let rows = |table: &Tensor| table.index_select(&flat, 0)?.reshape((b, t, half));
        if kernels::cpu_f32(x) {
            return fused::rope(x, &rows(&self.cos)?, &rows(&self.sin)?);
        }
        let gather = |table: &Tensor| -> Result<Tensor> {
            let g = rows(table)?.unsqueeze(1)?;
            Tensor::cat(&[&g, &g], D::Minus1)
        };
        let (cos, sin) = (gather(&self.cos)?, gather(&self.sin)?);
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// The weight matrices of one MLP block: `(intermediate, hidden)`, `(intermediate, hidden)`,
/// `(hidden, intermediate)`. The L2T compression penalty perturbs one such block (l2t-spec 5).
#[derive(Debug, Clone)]
pub struct MlpWeights {
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
}

impl MlpWeights {
    /// The three matrices in checkpoint order (gate, up, down).
    pub fn matrices(&self) -> [&Tensor; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    pub fn from_matrices([gate_proj, up_proj, down_proj]: [Tensor; 3]) -> Self {
        Self { gate_proj, up_proj, down_proj }
    }

    /// Whether the three matrices hold the same shapes and values as `other`'s.
    pub fn equals(&self, other: &Self) -> Result<bool> {
        for (a, b) in self.matrices().into_iter().zip(other.matrices()) {
            if a.dims() != b.dims() || a.ne(b)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Checkpoint names of the block's matrices in layer `layer`.
    pub fn names(layer: usize) -> [String; 3] {
        ["gate_proj", "up_proj", "down_proj"].map(|m| format!("model.layers.{layer}.mlp.{m}.weight"))
    }

    /// down(silu(gate x) * up x).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = swiglu(matmul_t(x, &self.gate_proj, None)?, matmul_t(x, &self.up_proj, None)?)?;
        matmul_t(&hidden, &self.down_proj, None)
    }
}

/// silu(gate) * up, the MLP's gated activation.
fn swiglu(gate: Tensor, up: Tensor) -> Result<Tensor> {
    if kernels::cpu_f32(&gate) {
        return fused::swiglu(&gate, &up);
    }
    gate.silu()? * up
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
    /// Gate and up packed as one gated product for inference ([`Model::pack_for_inference`]).
    gate_up: Option<Arc<PackedSwiGlu>>,
}

impl Mlp {
    /// Its matrices (gate, up, down).
    fn weights(&self) -> [&Tensor; 3] {
        [&self.gate_proj.weight, &self.up_proj.weight, &self.down_proj.weight]
    }

    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Proj::new(h, i, false, vb.pp("gate_proj"))?,
            up_proj: Proj::new(h, i, false, vb.pp("up_proj"))?,
            down_proj: Proj::new(i, h, false, vb.pp("down_proj"))?,
            gate_up: None,
        })
    }

    /// `residual + mlp(x)`.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let hidden = match self.gate_up.as_ref().filter(|_| gradient_free(&[x])) {
            Some(gate_up) => gate_up.forward(x)?,
            None => swiglu(self.gate_proj.forward(x)?, self.up_proj.forward(x)?)?,
        };
        self.down_proj.forward_residual(&hidden, residual)
    }
}

/// One layer's keys and values: (b, kv_heads, capacity, head_dim) buffers of which the first
/// `len` positions are filled.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Writes `k_new`, `v_new` (b, kv_heads, t, head_dim) after the filled positions, growing the
    /// buffers when they are full, and returns views of all filled positions of those `b` rows.
    /// `b` may be fewer than the cache's rows: the first `b` rows take the new positions, and the
    /// others keep zeros there (a pass over the rows whose sequences go on; the mask must keep
    /// every query from those zeros).
    fn append(slot: &mut Option<Self>, k_new: &Tensor, v_new: &Tensor, reserve: usize) -> Result<(Tensor, Tensor)> {
        let (rows, t) = (k_new.dim(0)?, k_new.dim(2)?);
        let len = slot.as_ref().map_or(0, |c| c.len);
        let capacity = slot.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        let cache_rows = slot.as_ref().map(|c| c.k.dim(0)).transpose()?;
        if let Some(b) = cache_rows.filter(|&b| rows > b) {
            candle_core::bail!("kv cache: {rows} rows appended to a cache of {b}");
        }
        if len + t > capacity {
            // Allocate once for the whole expected length (`reserve`), or exactly what is needed.
            let (_, heads, _, d) = k_new.dims4()?;
            let b = cache_rows.unwrap_or(rows);
            let cap = reserve.max(len + t);
            let k = Tensor::zeros((b, heads, cap, d), k_new.dtype(), k_new.device())?;
            let v = Tensor::zeros((b, heads, cap, d), v_new.dtype(), v_new.device())?;
            if let Some(old) = slot.as_ref() {
                k.slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                v.slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(Self { k, v, len });
        }
        let cache = slot.as_mut().expect("allocated above");
        // A row prefix of a buffer is itself contiguous: written in place like the whole.
        let (k, v) = (cache.k.narrow(0, 0, rows)?, cache.v.narrow(0, 0, rows)?);
        k.slice_set(&k_new.contiguous()?, 2, len)?;
        v.slice_set(&v_new.contiguous()?, 2, len)?;
        cache.len = len + t;
        Ok((k.narrow(2, 0, cache.len)?, v.narrow(2, 0, cache.len)?))
    }
}

/// Keys and values of the positions seen so far, per layer, in buffers written in place (no
/// per-step concatenation).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions each layer's buffer is sized for when first allocated.
    reserve: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self { layers: vec![None; layers], reserve: 0 }
    }

    /// A cache whose buffers hold `positions` positions without growing (a sampler's prompt plus
    /// its token budget).
    pub fn with_capacity(layers: usize, positions: usize) -> Self {
        Self { layers: vec![None; layers], reserve: positions }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |c| c.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes one row takes in every layer's key and value buffers (their whole capacity).
    pub fn row_bytes(&self) -> Result<usize> {
        let mut bytes = 0;
        for c in self.layers.iter().flatten() {
            let (_, heads, cap, d) = c.k.dims4()?;
            bytes += 2 * heads * cap * d * c.k.dtype().size_in_bytes();
        }
        Ok(bytes)
    }

    /// A cache whose row `j` is this cache's row `rows[j]` (rows: u32 indices).
    pub fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|c| Ok(LayerCache { k: c.k.index_select(rows, 0)?, v: c.v.index_select(rows, 0)?, len: c.len })).transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, reserve: self.reserve })
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    /// q, k and v packed as one product for inference ([`Model::pack_for_inference`]).
    qkv: Option<Arc<PackedLinear>>,
    /// Qwen3's per-head RMS norms of queries and keys.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, head_dim, bias) = (cfg.hidden_size, cfg.head_dim(), cfg.attention_bias());
        let (q, kv) = (cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim);
        let qk_norm = if cfg.qk_norm() {
            let norm = |name: &str| RmsNorm::new(head_dim, cfg.rms_norm_eps, vb.pp(name));
            Some((norm("q_norm")?, norm("k_norm")?))
        } else {
            None
        };
        Ok(Self {
            q_proj: Proj::new(h, q, bias, vb.pp("q_proj"))?,
            k_proj: Proj::new(h, kv, bias, vb.pp("k_proj"))?,
            v_proj: Proj::new(h, kv, bias, vb.pp("v_proj"))?,
            o_proj: Proj::new(q, h, false, vb.pp("o_proj"))?,
            qkv: None,
            qk_norm,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim,
        })
    }

    /// Queries, keys and values of `x` (b, t, hidden) as (b, heads, t, head_dim), before any norm
    /// or rotary: one stacked product when packed.
    fn project_heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if let Some(qkv) = self.qkv.as_ref().filter(|_| gradient_free(&[x])) {
            let y = qkv.forward(x)?.reshape((b, t, nh + 2 * nkv, hd))?;
            let heads = |from: usize, n: usize| -> Result<Tensor> { y.narrow(2, from, n)?.transpose(1, 2)?.contiguous() };
            return Ok((heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?));
        }
        let heads = |proj: &Proj, n: usize| -> Result<Tensor> { proj.forward(x)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous() };
        Ok((heads(&self.q_proj, nh)?, heads(&self.k_proj, nkv)?, heads(&self.v_proj, nkv)?))
    }

    /// Queries and keys, normed (when the model norms them) and rotated, and values, each
    /// (b, heads, t, head_dim). A packed projection without norms is split and rotated in one pass.
    fn rotated_heads(&self, x: &Tensor, positions: &Tensor, rotary: &RotaryEmbedding) -> Result<(Tensor, Tensor, Tensor)> {
        if let Some(qkv) = self.qkv.as_ref().filter(|_| self.qk_norm.is_none() && gradient_free(&[x])) {
            let (b, t, _) = x.dims3()?;
            let y = qkv.forward(x)?.reshape((b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim))?;
            return fused::split_heads_rotated(&y, (self.num_heads, self.num_kv_heads), positions, &rotary.cos, &rotary.sin);
        }
        let (mut q, mut k, v) = self.project_heads(x)?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        Ok((rotary.apply(&q, positions)?, rotary.apply(&k, positions)?, v))
    }

    /// `residual + attention(x)`. x: (b, t, hidden); mask: (b, 1, t, t_kv) additive; cache: this
    /// layer's past keys/values.
    fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        rotary: &RotaryEmbedding,
        cache: Option<LayerSlot>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.rotated_heads(x, positions, rotary)?;
        let (k, v) = match cache {
            Some((slot, reserve)) => LayerCache::append(slot, &k, &v, reserve)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if kernels::cpu_f32(&q) && gradient_free(&[&q, &k, &v]) {
            return self.o_proj.forward_residual(&attention::attention(&q, &k, &v, mask, scale)?, residual);
        }
        // Grouped-query attention without copying keys and values per query head: the query
        // heads that share a kv head are stacked along the time axis, (b, kv, n_rep * t, d), a
        // view of q (its heads are ordered kv head by kv head).
        let (kv, n_rep, total) = (self.num_kv_heads, self.num_heads / self.num_kv_heads, k.dim(2)?);
        let q = q.reshape((b, kv, n_rep * t, self.head_dim))?;
        let scores = q.matmul(&k.t()?)?;
        let probs = if kernels::cpu_f32(&scores) {
            fused::masked_softmax(&scores.reshape((b, self.num_heads, t, total))?, mask, scale)?
        } else {
            let scores = (widen(&scores)? * scale)?.reshape((b, kv, n_rep, t, total))?.broadcast_add(&mask.unsqueeze(2)?)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?
        };
        let y = probs.reshape((b, kv, n_rep * t, total))?.matmul(&v)?.reshape((b, self.num_heads, t, self.head_dim))?;
        self.o_proj.forward_residual(&y.transpose(1, 2)?.reshape((b, t, self.num_heads * self.head_dim))?, residual)
    }

    /// Attention over `x` and its tangent along `dx` (fixed weights), without a cache.
    fn jvp(&self, x: &Tensor, dx: &Tensor, positions: &Tensor, mask: &Tensor, rotary: &RotaryEmbedding) -> Result<Dual> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous() };
        let tangent = |proj: &Proj, n: usize| -> Result<Tensor> { heads(matmul_t(dx, &proj.weight, None)?, n) };
        let (q, k, v) = self.project_heads(x)?;
        let ((mut q, mut dq), (mut k, mut dk), (v, dv)) =
            ((q, tangent(&self.q_proj, nh)?), (k, tangent(&self.k_proj, nkv)?), (v, tangent(&self.v_proj, nkv)?));
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            (q, dq) = q_norm.jvp(&q, &dq)?;
            (k, dk) = k_norm.jvp(&k, &dk)?;
        }
        // Rotary is linear in its input: the tangent turns as the value does.
        let (q, dq) = (rotary.apply(&q, positions)?, rotary.apply(&dq, positions)?);
        let (k, dk) = (rotary.apply(&k, positions)?, rotary.apply(&dk, positions)?);
        let n_rep = nh / nkv;
        let stack = |y: Tensor| y.reshape((b, nkv, n_rep * t, hd));
        let (q, dq) = (stack(q)?, stack(dq)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let (kt, dkt) = (k.t()?, dk.t()?);
        let scores = (q.matmul(&kt)? * scale)?.reshape((b, nkv, n_rep, t, t))?.broadcast_add(&mask.unsqueeze(2)?)?;
        let d_scores = ((dq.matmul(&kt)? + q.matmul(&dkt)?)? * scale)?.reshape((b, nkv, n_rep, t, t))?;
        // d softmax(s) = p (ds - sum_j p_j ds_j).
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let dp = (&p * d_scores.broadcast_sub(&(&p * &d_scores)?.sum_keepdim(D::Minus1)?)?)?;
        let (p, dp) = (p.reshape((b, nkv, n_rep * t, t))?, dp.reshape((b, nkv, n_rep * t, t))?);
        let y = p.matmul(&v)?;
        let dy = (dp.matmul(&v)? + p.matmul(&dv)?)?;
        let merge = |y: Tensor| y.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd));
        let (y, dy) = (merge(y)?, merge(dy)?);
        Ok((self.o_proj.forward(&y)?, matmul_t(&dy, &self.o_proj.weight, None)?))
    }
}

/// A layer's cache slot and the capacity to reserve when it is first allocated.
type LayerSlot<'a> = (&'a mut Option<LayerCache>, usize);

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    /// x + attention(norm(x)).
    fn attend(&self, x: Tensor, positions: &Tensor, mask: &Tensor, rotary: &RotaryEmbedding, cache: Option<LayerSlot>) -> Result<Tensor> {
        self.self_attn.forward_residual(&self.input_layernorm.forward(&x)?, &x, positions, mask, rotary, cache)
    }

    fn forward(&self, x: Tensor, positions: &Tensor, mask: &Tensor, rotary: &RotaryEmbedding, cache: Option<LayerSlot>) -> Result<Tensor> {
        self.mlp_residual(self.attend(x, positions, mask, rotary, cache)?)
    }

    /// x + mlp(norm(x)).
    fn mlp_residual(&self, x: Tensor) -> Result<Tensor> {
        self.mlp.forward_residual(&self.post_attention_layernorm.forward(&x)?, &x)
    }

    /// The layer over `x` and its tangent along `dx` (fixed weights).
    fn jvp(&self, x: &Tensor, dx: &Tensor, positions: &Tensor, mask: &Tensor, rotary: &RotaryEmbedding) -> Result<Dual> {
        let (n, dn) = self.input_layernorm.jvp(x, dx)?;
        let (a, da) = self.self_attn.jvp(&n, &dn, positions, mask, rotary)?;
        let (x, dx) = ((x + a)?, (dx + da)?);
        let (n, dn) = self.post_attention_layernorm.jvp(&x, &dx)?;
        let (y, dy) = mlp_jvp(self.mlp.weights(), &n, Some(&dn), None)?;
        Ok(((x + y)?, (dx + dy)?))
    }
}

/// The decoder with its language-model head.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: RotaryEmbedding,
    pub cfg: Config,
}

impl Model {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers).map(|l| DecoderLayer::new(cfg, m.pp(format!("layers.{l}")))).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Proj { weight: embed_tokens.embeddings().clone(), bias: None, packed: None }
        } else {
            Proj::new(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        let rotary = RotaryEmbedding::new(cfg, vb.dtype(), vb.device())?;
        Ok(Self { embed_tokens, layers, norm, lm_head, rotary, cfg: cfg.clone() })
    }

    /// Logits (b, t, vocab) for tokens (b, t) at `positions` (b, t), under an additive `mask`
    /// (b, 1, t, t_past + t). With a cache, the new keys/values are appended to it.
    pub fn forward(&self, tokens: &Tensor, positions: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let x = self.embed_tokens.forward(tokens)?;
        self.run_layers(x, 0, positions, mask, cache)
    }

    /// The residual stream (b, t, hidden) entering the MLP of layer `layer`, after its attention.
    pub fn forward_to_mlp(&self, tokens: &Tensor, positions: &Tensor, mask: &Tensor, layer: usize) -> Result<Tensor> {
        let mask = self.mask_for(mask)?;
        let mut x = self.embed_tokens.forward(tokens)?;
        for l in &self.layers[..layer] {
            x = l.forward(x, positions, &mask, &self.rotary, None)?;
        }
        self.layers[layer].attend(x, positions, &mask, &self.rotary, None)
    }

    /// Logits from the residual `x` entering layer `layer`'s MLP ([`Self::forward_to_mlp`]), with
    /// that MLP's weights replaced by `block`.
    pub fn forward_from_mlp(&self, x: &Tensor, positions: &Tensor, mask: &Tensor, layer: usize, block: &MlpWeights) -> Result<Tensor> {
        let post = &self.layers[layer].post_attention_layernorm;
        let x = (x + block.forward(&post.forward(x)?)?)?;
        self.run_layers(x, layer + 1, positions, mask, None)
    }

    /// `d/de log p(target)` at `e = 0` when layer `layer`'s MLP weights are `theta + e dir`, at
    /// each row's scored columns (`windows[r] = (from, len)`), from the residual `x` (b, t,
    /// hidden) entering that MLP ([`Self::forward_to_mlp`]): forward-mode differentiation, the
    /// tangent carried through the layers above, the final norm and the head to each target's
    /// log-probability, `dz[target] - sum softmax(z) dz`. Exact, in the model's dtype, one pass;
    /// the head (the costliest product, over the vocabulary) runs at the scored columns alone.
    #[allow(clippy::too_many_arguments)]
    pub fn jvp_target_logprobs(
        &self,
        x: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        layer: usize,
        (theta, dir): (&MlpWeights, &MlpWeights),
        targets: &Tensor,
        windows: &[(usize, usize)],
    ) -> Result<Vec<Vec<f32>>> {
        let (b, t, _) = x.dims3()?;
        if windows.len() != b || windows.iter().any(|&(from, len)| from + len > t) || targets.dims2()? != (b, t) {
            candle_core::bail!("jvp: windows {windows:?} or targets {:?} do not fit a batch of {b} x {t}", targets.dims());
        }
        if windows.iter().all(|&(_, len)| len == 0) {
            return Ok(vec![Vec::new(); b]);
        }
        // The scored columns of every row, stacked: (scored, ...).
        let scored = |x: &Tensor| -> Result<Tensor> {
            let rows = windows.iter().enumerate().filter(|(_, w)| w.1 > 0).map(|(r, &(from, len))| x.get(r)?.narrow(0, from, len));
            Tensor::cat(&rows.collect::<Result<Vec<_>>>()?, 0)
        };
        let post = &self.layers[layer].post_attention_layernorm;
        let (n, dn) = if layer + 1 == self.layers.len() {
            // Nothing above the block mixes positions: only the scored ones go through it.
            let x = scored(x)?;
            let (y, dy) = mlp_jvp(theta.matrices(), &post.forward(&x)?, None, Some(dir.matrices()))?;
            self.norm.jvp(&(x + y)?, &dy)?
        } else {
            let mask = self.mask_for(mask)?;
            let (y, dy) = mlp_jvp(theta.matrices(), &post.forward(x)?, None, Some(dir.matrices()))?;
            let (mut x, mut dx) = ((x + y)?, dy);
            for l in &self.layers[layer + 1..] {
                (x, dx) = l.jvp(&x, &dx, positions, &mask, &self.rotary)?;
            }
            let (n, dn) = self.norm.jvp(&x, &dx)?;
            (scored(&n)?, scored(&dn)?)
        };
        let targets: Vec<u32> = scored(&targets.unsqueeze(D::Minus1)?)?.flatten_all()?.to_vec1()?;
        let mut tangents = self.head_tangents(&n, &dn, &targets)?.into_iter();
        Ok(windows.iter().map(|&(_, len)| tangents.by_ref().take(len).collect()).collect())
    }

    /// `dz[target] - sum softmax(z) dz` of each row of `n`, `dn` (rows, hidden), with `z` and `dz`
    /// their head logits: a packed head reduces a chunk of rows at a time in f32; otherwise the
    /// composed ops run over chunks of rows (never all logits at once).
    fn head_tangents(&self, n: &Tensor, dn: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        if let Some(head) = self.lm_head.packed.as_ref().filter(|_| gradient_free(&[n, dn]) && n.dtype() == DType::F32) {
            return head.target_logprob_tangents(&n.flatten_all()?.to_vec1()?, &dn.flatten_all()?.to_vec1()?, targets);
        }
        const CHUNK: usize = 64;
        let head = &self.lm_head.weight;
        let mut out = Vec::with_capacity(targets.len());
        for (i, chunk) in targets.chunks(CHUNK).enumerate() {
            let rows = |x: &Tensor| x.narrow(0, i * CHUNK, chunk.len());
            let (z, dz) = (matmul_t(&rows(n)?, head, None)?, matmul_t(&rows(dn)?, head, None)?);
            let target = Tensor::from_slice(chunk, (chunk.len(), 1), n.device())?;
            let picked = dz.gather(&target, D::Minus1)?.squeeze(D::Minus1)?;
            let expected = (candle_nn::ops::softmax(&z, D::Minus1)? * dz)?.sum(D::Minus1)?;
            out.extend((picked - expected)?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// The weights of layer `layer`'s MLP block.
    pub fn mlp_weights(&self, layer: usize) -> MlpWeights {
        let mlp = &self.layers[layer].mlp;
        MlpWeights { gate_proj: mlp.gate_proj.weight.clone(), up_proj: mlp.up_proj.weight.clone(), down_proj: mlp.down_proj.weight.clone() }
    }

    /// Packs every projection for gradient-free products (an f32 CPU model that samples and
    /// scores but is never trained); costs one more copy of the projection weights.
    /// Projections of one input are packed as one product (q, k and v; gate and up): a decode
    /// step's products are small, and each costs a parallel region of its own.
    pub fn pack_for_inference(&mut self) -> Result<()> {
        let mut jobs: Vec<Packing> = vec![Packing::One(&mut self.lm_head)];
        for layer in &mut self.layers {
            let Attention { q_proj, k_proj, v_proj, o_proj, qkv, .. } = &mut layer.self_attn;
            jobs.extend([Packing::Stacked(qkv, vec![q_proj, k_proj, v_proj]), Packing::One(o_proj)]);
            let Mlp { gate_proj, up_proj, down_proj, gate_up } = &mut layer.mlp;
            jobs.extend([Packing::Gated(gate_up, [gate_proj, up_proj]), Packing::One(down_proj)]);
        }
        jobs.retain(|job| job.packable());
        // Every projection at once: one matrix has too few panels to keep the cores busy.
        jobs.into_par_iter().try_for_each(Packing::run)
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.embeddings().device().clone()
    }

    /// Layers `from..` then the final norm and the head.
    fn run_layers(&self, x: Tensor, from: usize, positions: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.run_hidden(x, from, positions, mask, cache)?;
        self.logits(&h)
    }

    /// The additive mask in the dtype of the attention scores it is added to: the model's, or f32
    /// in half precision (whose softmax runs in f32).
    fn mask_for(&self, mask: &Tensor) -> Result<Tensor> {
        mask.to_dtype(if is_half(self.dtype()) { DType::F32 } else { self.dtype() })
    }

    /// The head over the final norm of `h`; logits in f32 when the model runs in half precision.
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        widen(&self.lm_head.forward(&self.norm.forward(h)?)?)
    }

    /// The residual stream after layers `from..`, before the final norm.
    fn run_hidden(&self, x: Tensor, from: usize, positions: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (h, _) = self.run_layers_capturing(x, from, positions, mask, cache, None, true)?;
        h.ok_or_else(|| candle_core::Error::Msg("a pass asked for its output gave none".into()))
    }

    /// Layers `from..`, also returning the residual entering layer `capture`'s MLP. Without
    /// `output` (a pass kept for its cache and capture alone) the last layer's MLP, whose result
    /// only the head reads, is not run and no output comes back.
    #[allow(clippy::too_many_arguments)]
    fn run_layers_capturing(
        &self,
        mut x: Tensor,
        from: usize,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        capture: Option<usize>,
        output: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mask = self.mask_for(mask)?;
        let mut captured = None;
        let last = self.layers.len().saturating_sub(1);
        for (l, layer) in self.layers.iter().enumerate().skip(from) {
            let slot = cache.as_mut().map(|c| (&mut c.layers[l], c.reserve));
            let mid = layer.attend(x, positions, &mask, &self.rotary, slot)?;
            if capture == Some(l) {
                captured = Some(mid.clone());
            }
            if !output && l == last {
                return Ok((None, captured));
            }
            x = layer.mlp_residual(mid)?;
        }
        Ok((Some(x), captured))
    }

    /// Extends `cache` by `tokens` (b, t) without running the head, and returns the residual
    /// entering layer `capture`'s MLP ([`Self::forward_to_mlp`]'s value) when asked: a pass that
    /// both seeds continuations from the cache and feeds the penalty's tangent.
    pub fn prefill(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
        capture: Option<usize>,
    ) -> Result<Option<Tensor>> {
        if capture.is_some_and(|l| l >= self.layers.len()) {
            candle_core::bail!("capture layer {capture:?} of a model with {} layers", self.layers.len());
        }
        Ok(self.run_layers_capturing(self.embed_tokens.forward(tokens)?, 0, positions, mask, Some(cache), capture, false)?.1)
    }

    /// log p(target) (b, t) of `targets` (b, t) after `tokens` (b, t): the logits of a packed
    /// head are reduced a chunk of rows at a time (never all held at once); otherwise the full
    /// logits go through [`super::token_logprobs`] (differentiable).
    pub fn target_logprobs(&self, tokens: &Tensor, positions: &Tensor, mask: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let h = self.run_hidden(self.embed_tokens.forward(tokens)?, 0, positions, mask, None)?;
        match &self.lm_head.packed {
            Some(head) if gradient_free(&[&h]) => {
                let h = self.norm.forward(&h)?;
                let (b, t, _) = h.dims3()?;
                let x: Vec<f32> = h.flatten_all()?.to_vec1()?;
                let logp = head.target_logprobs(&x, &targets.flatten_all()?.to_vec1()?)?;
                Tensor::from_vec(logp, (b, t), h.device())
            }
            _ => super::token_logprobs(&self.logits(&h)?, targets),
        }
    }

    /// log p(target) (b, len) of `targets` (b, t) at the positions `from..from + len` only, after
    /// `tokens` (b, t) that extend `cache`: the head (the costliest matrix of a small model's pass,
    /// with its vocabulary rows) runs at those positions alone. Each position's value is the one
    /// the full head would give it.
    pub fn target_logprobs_window(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        targets: &Tensor,
        (from, len): (usize, usize),
    ) -> Result<Tensor> {
        let h = self.run_hidden(self.embed_tokens.forward(tokens)?, 0, positions, mask, cache)?;
        super::token_logprobs(&self.logits(&h.narrow(1, from, len)?)?, &targets.narrow(1, from, len)?.contiguous()?)
    }

    /// Logits (b, vocab) of the last position only, for tokens (b, t): what a sampler needs after
    /// a prefill (the head over every prompt position would be wasted work).
    pub fn forward_last(&self, tokens: &Tensor, positions: &Tensor, mask: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.run_hidden(self.embed_tokens.forward(tokens)?, 0, positions, mask, cache)?;
        self.logits(&h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?)
    }
}

/// Causal mask for a batch of right-padded sequences starting at position 0: (b, 1, t, t).
pub fn causal_mask(b: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { MASKED })).collect();
    Tensor::from_vec(mask, (1, 1, t, t), dev)?.expand((b, 1, t, t))?.contiguous()
}

/// Mask for left-padded rows: query `i` of row `r` (absolute slot `past + i`) sees key slots
/// `pad[r]..=past + i`; a padding query sees only itself, so no row of scores is fully masked.
pub fn padded_mask(pad: &[usize], past: usize, t: usize, dev: &Device) -> Result<Tensor> {
    let total = past + t;
    let mut mask = Vec::with_capacity(pad.len() * t * total);
    for &p in pad {
        for i in 0..t {
            let q = past + i;
            for j in 0..total {
                let visible = (j >= p && j <= q) || j == q;
                mask.push(if visible { 0.0 } else { MASKED });
            }
        }
    }
    Tensor::from_vec(mask, (pad.len(), 1, t, total), dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotary embedding makes q.k depend on the positions only through their difference.
    #[test]
    fn rotary_scores_depend_only_on_relative_position() {
        let shape = crate::config::ModelShape { hidden_size: 32, num_attention_heads: 2, num_key_value_heads: 1, ..Default::default() };
        let cfg = crate::model::tiny_config(&shape, 0);
        let dev = Device::Cpu;
        let rotary = RotaryEmbedding::new(&cfg, DType::F32, &dev).unwrap();
        let q = Tensor::from_vec((0..16).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), (1, 1, 1, 16), &dev).unwrap();
        let k = Tensor::from_vec((0..16).map(|i| (i as f32 * 0.91).cos()).collect::<Vec<_>>(), (1, 1, 1, 16), &dev).unwrap();
        let score = |pq: u32, pk: u32| -> f32 {
            let rq = rotary.apply(&q, &Tensor::new(&[[pq]], &dev).unwrap()).unwrap();
            let rk = rotary.apply(&k, &Tensor::new(&[[pk]], &dev).unwrap()).unwrap();
            (rq * rk).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        for (a, b) in [(5, 2), (40, 37), (100, 97)] {
            assert!((score(a, b) - score(5, 2)).abs() < 1e-4, "{a},{b}");
        }
        assert!((score(5, 2) - score(5, 4)).abs() > 1e-3, "scores must change with distance");
    }
}
