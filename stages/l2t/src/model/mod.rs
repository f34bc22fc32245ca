//! The policy: a Qwen2-family decoder, its tokenizer, and its checkpoints: Hugging Face
//! directories (read and written) and GGUF files (read).

pub mod chat;
pub mod gguf;
pub mod hf;
pub mod qwen2;
pub mod score;
pub mod tokenizer;

use crate::config::ModelShape;
use crate::kernels::{self, fused};
use crate::store::{Artifact, Caching, Staging};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

pub use hf::{Checkpoint, CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
pub use qwen2::{Config, KvCache, Model, TokenIds};

/// The files of a checkpoint the pipeline writes.
pub const CHECKPOINT_FILES: &[&str] = &[CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE];

/// Weights by checkpoint name, in name order.
pub type Weights = BTreeMap<String, Tensor>;

/// The config.json of a tiny policy of this shape.
pub fn tiny_config(shape: &ModelShape, eos_id: u32) -> Config {
    Config {
        architectures: vec!["Qwen2ForCausalLM".into()],
        model_type: "qwen2".into(),
        vocab_size: shape.vocab_size,
        hidden_size: shape.hidden_size,
        intermediate_size: shape.intermediate_size,
        num_hidden_layers: shape.num_hidden_layers,
        num_attention_heads: shape.num_attention_heads,
        num_key_value_heads: shape.num_key_value_heads,
        head_dim: None,
        max_position_embeddings: shape.max_position_embeddings,
        rope_theta: shape.rope_theta,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: shape.tie_word_embeddings,
        attention_bias: None,
        rope_scaling: None,
        bos_token_id: Some(eos_id),
        eos_token_id: Some(TokenIds::One(eos_id)),
        torch_dtype: "float32".into(),
        extra: Default::default(),
    }
}

/// tokenizer_config.json of the tiny policy: its special tokens, no chat template (its prompts
/// are raw text).
pub fn tiny_tokenizer_config(max_len: usize) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer::EOS,
        "eos_token": tokenizer::EOS,
        "pad_token": tokenizer::PAD,
        "model_max_length": max_len,
        "padding_side": "left",
        "clean_up_tokenization_spaces": false,
    })
}

/// Seeded initial weights: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2 layers)
/// (GPT-2), zero biases, unit norms.
pub fn init_weights(cfg: &Config, seed: u64, dev: &Device) -> Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x696e_6974); // "init"
    let residual_scale = 1.0 / (2.0 * cfg.num_hidden_layers as f32).sqrt();
    let mut weights = Weights::new();
    for (name, shape) in cfg.tensor_shapes() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let scale = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") { residual_scale } else { 1.0 };
            (0..n).map(|_| 0.02 * scale * standard_normal(&mut rng)).collect()
        };
        weights.insert(name, Tensor::from_vec(values, shape, dev)?);
    }
    Ok(weights)
}

/// One N(0, 1) draw (Box-Muller), so initialisation depends only on our seeded generator.
pub fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Builds the model over a set of weights (which may be `Var`s being trained).
pub fn build_model(cfg: &Config, weights: &Weights, dev: &Device) -> Result<Model> {
    build_model_as(cfg, weights, DType::F32, dev)
}

/// Builds the model with its weights converted to `dtype` (f64 where differences of nearby
/// weights must be resolved, l2t-spec 5).
pub fn build_model_as(cfg: &Config, weights: &Weights, dtype: DType, dev: &Device) -> Result<Model> {
    let map: HashMap<String, Tensor> = weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let vb = VarBuilder::from_tensors(map, dtype, dev);
    Model::new(cfg, vb).context("building the model from its weights")
}

/// The model from decoder layer `from` up, renumbered from 0, with the final norm and the head,
/// in `dtype`: what the penalty's passes above its proxy block run on, without a copy of the
/// layers below (which it never reads).
pub fn build_top_as(cfg: &Config, weights: &Weights, from: usize, dtype: DType, dev: &Device) -> Result<Model> {
    if from >= cfg.num_hidden_layers {
        bail!("layer {from} is not below the model's {} layers", cfg.num_hidden_layers);
    }
    const LAYERS: &str = "model.layers.";
    let mut top = Weights::new();
    for (name, t) in weights {
        let renamed = match name.strip_prefix(LAYERS).and_then(|rest| rest.split_once('.')) {
            Some((n, rest)) => match n.parse::<usize>() {
                Ok(n) if n >= from => format!("{LAYERS}{}.{rest}", n - from),
                _ => continue,
            },
            None => name.clone(),
        };
        top.insert(renamed, t.clone());
    }
    let cfg = Config { num_hidden_layers: cfg.num_hidden_layers - from, ..cfg.clone() };
    build_model_as(&cfg, &top, dtype, dev)
}

/// The checkpoint of a store artifact (weights, config, tokenizer), each file verified against the
/// manifest, without building a model over it.
pub fn read_artifact_checkpoint(artifact: &Artifact, dev: &Device) -> Result<Checkpoint> {
    hf::read(&artifact.dir.display().to_string(), |f| locate_in(artifact, f), dev)
}

/// config.json and the named tensors alone of a checkpoint artifact.
pub fn read_artifact_tensors(artifact: &Artifact, dev: &Device, names: &[String]) -> Result<(Config, Weights)> {
    hf::read_tensors(&artifact.dir.display().to_string(), |f| locate_in(artifact, f), dev, names)
}

/// An output file of a checkpoint artifact, verified; `None` when the artifact has none.
fn locate_in(artifact: &Artifact, file: &str) -> Result<Option<std::path::PathBuf>> {
    if artifact.manifest.output(file).is_ok() {
        artifact.file(file).map(Some)
    } else {
        Ok(None)
    }
}

/// A loaded policy checkpoint.
pub struct Policy {
    pub cfg: Config,
    pub model: Model,
    pub weights: Weights,
    pub tokenizer: tokenizers::Tokenizer,
    pub tokenizer_config: serde_json::Value,
    /// The token a response ends with (the first of `stop_ids`).
    pub eos_id: u32,
    /// Every token that ends a response.
    pub stop_ids: Vec<u32>,
    /// Filler of padded batch positions (never attended to).
    pub pad_id: u32,
    /// Content hash of `model.safetensors`: which policy produced a rollout.
    pub weights_hash: String,
    /// Content hash of `tokenizer.json`.
    pub tokenizer_hash: String,
    pub device: Device,
}

impl Policy {
    /// A policy over a checkpoint in memory (not yet, or never, written as an artifact).
    pub fn from_checkpoint(ckpt: Checkpoint, dev: &Device) -> Result<Self> {
        Self::from_checkpoint_as(ckpt, dev, DType::F32)
    }

    /// The same, with the model's passes in `dtype` (`weights` stay as read: f32).
    pub fn from_checkpoint_as(ckpt: Checkpoint, dev: &Device, dtype: DType) -> Result<Self> {
        Self::assemble(ckpt, dev, dtype, true)
    }

    /// The policy over `ckpt`, its projections packed for gradient-free passes when `pack`.
    fn assemble(ckpt: Checkpoint, dev: &Device, dtype: DType, pack: bool) -> Result<Self> {
        let Checkpoint { cfg, weights, tokenizer, tokenizer_config } = ckpt;
        let (eos_id, stop_ids, pad_id) = special_ids(&cfg, &tokenizer, &tokenizer_config)?;
        let mut model = build_model_as(&cfg, &weights, dtype, dev)?;
        if pack {
            model.pack_for_inference()?;
        }
        Ok(Self {
            model,
            cfg,
            weights,
            tokenizer,
            tokenizer_config,
            eos_id,
            stop_ids,
            pad_id,
            weights_hash: String::new(),
            tokenizer_hash: String::new(),
            device: dev.clone(),
        })
    }

    /// A tiny-task policy over weights in memory (tests, benchmarks).
    pub fn from_parts(cfg: &Config, weights: &Weights, tokenizer: tokenizers::Tokenizer, dev: &Device) -> Result<Self> {
        let tokenizer_config = tiny_tokenizer_config(cfg.max_position_embeddings);
        Self::from_checkpoint(Checkpoint { cfg: cfg.clone(), weights: weights.clone(), tokenizer, tokenizer_config }, dev)
    }

    /// Loads a checkpoint artifact, verifying each file against its manifest.
    pub fn load(artifact: &Artifact, dev: &Device) -> Result<Self> {
        Self::load_as(artifact, dev, DType::F32)
    }

    /// Loads a checkpoint artifact for passes in `dtype` (the `dtype` knob).
    pub fn load_as(artifact: &Artifact, dev: &Device, dtype: DType) -> Result<Self> {
        Self::load_artifact(artifact, dev, dtype, true)
    }

    /// Loads a checkpoint artifact to be trained (f32, nothing packed): the update reads its
    /// weights and scores with the model only to audit, so packing would be work for nothing.
    pub fn load_for_update(artifact: &Artifact, dev: &Device) -> Result<Self> {
        Self::load_artifact(artifact, dev, DType::F32, false)
    }

    fn load_artifact(artifact: &Artifact, dev: &Device, dtype: DType, pack: bool) -> Result<Self> {
        let mut policy = Self::assemble(read_artifact_checkpoint(artifact, dev)?, dev, dtype, pack)?;
        policy.weights_hash = artifact.manifest.output(WEIGHTS_FILE)?.blake3.clone();
        policy.tokenizer_hash = artifact.manifest.output(TOKENIZER_FILE)?.blake3.clone();
        Ok(policy)
    }

    /// Whether `token` ends a response.
    pub fn is_stop(&self, token: u32) -> bool {
        self.stop_ids.contains(&token)
    }

    /// The checkpoint's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        hf::chat_template(&self.tokenizer_config)
    }
}

/// Reads a checkpoint from a GGUF file or a Hugging Face directory.
pub fn read_checkpoint(path: &Path, dev: &Device) -> Result<Checkpoint> {
    if path.is_dir() {
        hf::read_dir(path, dev)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        gguf::read(path, dev)
    } else {
        bail!("{}: neither a Hugging Face checkpoint directory nor a .gguf file", path.display())
    }
}

/// End-of-response ids (config.json's `eos_token_id`, else the tokenizer's `eos_token` or
/// `<|endoftext|>`) and the padding id (`pad_token`, else `<|pad|>`, else end of response).
fn special_ids(cfg: &Config, tok: &tokenizers::Tokenizer, tok_cfg: &serde_json::Value) -> Result<(u32, Vec<u32>, u32)> {
    let named = |key: &str| -> Option<u32> {
        let v = tok_cfg.get(key)?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        tok.token_to_id(text)
    };
    let mut stops = cfg.eos_ids();
    for extra in [named("eos_token"), tok.token_to_id(tokenizer::EOS)] {
        if stops.is_empty() {
            stops.extend(extra);
        }
    }
    let Some(&eos) = stops.first() else {
        bail!("the checkpoint names no end-of-sequence token (config.json eos_token_id, tokenizer_config.json eos_token)");
    };
    if let Some(bad) = stops.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        bail!("end-of-sequence id {bad} is outside the vocabulary ({} rows)", cfg.vocab_size);
    }
    let pad = named("pad_token").or_else(|| tok.token_to_id(tokenizer::PAD)).unwrap_or(eos);
    Ok((eos, stops, pad))
}

/// Writes a checkpoint as a Hugging Face directory into a stage's outputs.
pub fn save_checkpoint(
    staging: &mut Staging,
    cfg: &Config,
    weights: &Weights,
    tokenizer: &tokenizers::Tokenizer,
    tokenizer_config: &serde_json::Value,
) -> Result<()> {
    let mut write = |file: &str, bytes: &[u8]| staging.write_file(file, bytes);
    // The weights are written in f32, whatever the source's dtype.
    let mut cfg = cfg.clone();
    cfg.torch_dtype = "float32".into();
    if cfg.extra.contains_key("dtype") {
        cfg.extra.insert("dtype".into(), "float32".into());
    }
    write(CONFIG_FILE, serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    let generation = serde_json::json!({ "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id });
    write(GENERATION_CONFIG_FILE, serde_json::to_string_pretty(&generation)?.as_bytes())?;
    let tok = tokenizer.to_string(true).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    write(TOKENIZER_FILE, tok.as_bytes())?;
    write(TOKENIZER_CONFIG_FILE, serde_json::to_string_pretty(tokenizer_config)?.as_bytes())?;
    let tensors: Vec<(&str, &Tensor)> = weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_safetensors(staging, WEIGHTS_FILE, &tensors, Caching::Cached).context("writing the weights")
}

/// Writes `tensors` as the safetensors file `file` of `staging`, one tensor at a time: the bytes
/// `safetensors::serialize` gives, without the whole file (weights or AdamW moments: the largest
/// outputs of a stage) held in memory a second time.
pub fn write_safetensors(staging: &mut Staging, file: &str, tensors: &[(&str, &Tensor)], caching: Caching) -> Result<()> {
    use safetensors::View;
    use std::io::Write;
    /// A tensor's header entry without its data: `serialize` over these writes the header alone.
    struct HeaderOnly {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        len: usize,
    }
    impl View for &HeaderOnly {
        fn dtype(&self) -> safetensors::Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&[])
        }
        fn data_len(&self) -> usize {
            self.len
        }
    }
    // safetensors' order: by descending dtype, then by name.
    let mut order: Vec<&(&str, &Tensor)> = tensors.iter().collect();
    order.sort_by(|(a, x), (b, y)| View::dtype(*y).cmp(&View::dtype(*x)).then(a.cmp(b)));
    let heads: Vec<HeaderOnly> =
        order.iter().map(|(_, t)| HeaderOnly { dtype: View::dtype(*t), shape: t.dims().to_vec(), len: View::data_len(*t) }).collect();
    let header =
        safetensors::serialize(order.iter().map(|(name, _)| *name).zip(&heads), None).with_context(|| format!("{file}: header"))?;
    let mut w = staging.create(file, caching)?;
    w.write_all(&header).with_context(|| format!("{file}: cannot write"))?;
    // f32 CPU tensors go out from their own storage through one reused buffer (candle's `data()`
    // copies each tensor twice into fresh memory); anything else through `data()`.
    let mut bytes = Vec::with_capacity(1 << 20);
    for (_, t) in order {
        let (storage, layout) = t.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((start, end))) => {
                for chunk in values[start..end].chunks(1 << 18) {
                    bytes.clear();
                    bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                    w.write_all(&bytes).with_context(|| format!("{file}: cannot write"))?;
                }
            }
            _ => {
                drop(storage);
                w.write_all(&View::data(*t)).with_context(|| format!("{file}: cannot write"))?;
            }
        }
    }
    staging.record(file, w, None)
}

/// Reads the tensors of a safetensors file that `keep` accepts, as f32, each straight into its
/// own buffer by positional reads on every core: the file is never held in memory whole beside
/// its tensors (candle's loader reads it all first, which for a policy's AdamW moments is a GB of
/// memory touched for nothing), and the tensors `keep` refuses are not read.
pub fn read_safetensors_as_f32(path: &Path, dev: &Device, keep: impl Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let file_len = file.metadata()?.len();
    let (data_start, entries) = safetensors_header(&mut std::io::BufReader::new(&file), file_len, path)?;
    // Pieces of a tensor read in parallel: the embedding alone is a fifth of a small model.
    const PIECE: usize = 4 << 20;
    let mut out = Vec::new();
    for entry in entries.into_iter().filter(|e| keep(&e.name)) {
        let offset = data_start + entry.start;
        let cut_short = || format!("{}: tensor {} is cut short", path.display(), entry.name);
        let read_into = |bytes: &mut [u8]| -> Result<()> {
            bytes
                .par_chunks_mut(PIECE)
                .enumerate()
                .try_for_each(|(i, piece)| file.read_exact_at(piece, offset + (i * PIECE) as u64))
                .with_context(cut_short)
        };
        let tensor = tensor_from_bytes(&entry, dev, read_into)?;
        out.push((entry.name, tensor));
    }
    Ok(out)
}

/// [`read_safetensors_as_f32`] of a store output read around the page cache and verified
/// ([`Artifact::read_uncached`]): a policy's AdamW moments. The file streams through one pass
/// that is also its hash check.
pub fn read_uncached_safetensors_as_f32(artifact: &Artifact, file: &str, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut read = artifact.read_uncached(file)?;
    let (len, path) = (read.len(), read.path().to_path_buf());
    let (_, entries) = safetensors_header(&mut read, len, &path)?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let cut_short = || format!("{}: tensor {} is cut short", path.display(), entry.name);
        let tensor = tensor_from_bytes(&entry, dev, |bytes| read.read_exact(bytes).with_context(cut_short))?;
        out.push((entry.name, tensor));
    }
    read.finish()?;
    Ok(out)
}

/// The f32 tensor of `entry`, its `entry.len` bytes written by `fill`: for f32, straight into the
/// tensor's buffer.
fn tensor_from_bytes(entry: &TensorEntry, dev: &Device, fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<Tensor> {
    if entry.dtype == DType::F32 {
        let mut values = vec![0f32; entry.len / 4];
        // SAFETY: the byte view covers exactly the `values.len() * 4` initialised bytes that
        // `values` owns, u8 needs no alignment, and any 32 bits are a valid f32.
        fill(unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4) })?;
        if cfg!(target_endian = "big") {
            values.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
        }
        Ok(Tensor::from_vec(values, entry.shape.clone(), dev)?)
    } else {
        let mut raw = vec![0u8; entry.len];
        fill(&mut raw)?;
        Ok(Tensor::from_raw_buffer(&raw, entry.dtype, &entry.shape, dev)?.to_dtype(DType::F32)?)
    }
}

/// One tensor of a safetensors file: `len` bytes from `start`, counted from the data section.
struct TensorEntry {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    start: u64,
    len: usize,
}

/// The header of a safetensors file of `file_len` bytes read from its first byte in `reader`,
/// checked: the data section's offset in the file, and the float tensors in the order they tile
/// it (what safetensors itself requires), up to the file's end.
fn safetensors_header(reader: &mut impl std::io::Read, file_len: u64, path: &Path) -> Result<(u64, Vec<TensorEntry>)> {
    let fail = || format!("{}: not a safetensors file of float tensors", path.display());
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).with_context(fail)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > (100 << 20) || 8 + header_len > file_len {
        bail!("{}: header of {header_len} bytes", fail());
    }
    let mut header = vec![0u8; header_len as usize];
    reader.read_exact(&mut header).with_context(fail)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).with_context(fail)?;
    let mut entries = Vec::new();
    for (name, info) in header.iter().filter(|(name, _)| *name != "__metadata__") {
        let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            Some("F64") => DType::F64,
            other => bail!("{}: tensor {name} has dtype {other:?} (F32, BF16, F16 or F64 expected)", fail()),
        };
        let shape: Option<Vec<usize>> = info.get("shape").and_then(|s| serde_json::from_value(s.clone()).ok());
        let offsets: Option<(u64, u64)> = info.get("data_offsets").and_then(|s| serde_json::from_value(s.clone()).ok());
        let (Some(shape), Some((start, end))) = (shape, offsets) else {
            bail!("{}: tensor {name} has no shape or offsets", fail());
        };
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        if elements.and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64)) != end.checked_sub(start) {
            bail!("{}: tensor {name}: offsets {start}..{end} for {dtype:?} of shape {shape:?}", fail());
        }
        let len = usize::try_from(end - start).with_context(fail)?;
        entries.push(TensorEntry { name: name.clone(), shape, dtype, start, len });
    }
    entries.sort_by_key(|e| e.start);
    let mut at = 0;
    for e in &entries {
        if e.start != at {
            bail!("{}: tensor {} starts at {}, not {at}", fail(), e.name, e.start);
        }
        at = e.start + e.len as u64;
        if 8 + header_len + at > file_len {
            bail!("{}: tensor {} is cut short", path.display(), e.name);
        }
    }
    if 8 + header_len + at != file_len {
        bail!("{}: {} bytes after the last tensor", fail(), file_len - 8 - header_len - at);
    }
    Ok((8 + header_len, entries))
}

/// log p(target) under logits: (b, t, vocab), (b, t) u32 -> (b, t). Differentiable.
///
/// The target's logit minus the log-sum-exp of its row ("selective log-softmax"): the full
/// log-softmax over the vocabulary is never materialised. In f32 on the CPU one fused kernel
/// does it (its backward pass writes the one (b, t, vocab) gradient); otherwise composed ops.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if kernels::cpu_f32(logits) {
        return fused::target_logprobs(logits, targets);
    }
    // The shift keeps exp in range; log-sum-exp does not depend on it, so no gradient flows to it.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let picked = logits.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    (picked - lse)?.squeeze(D::Minus1)
}

/// A teacher-forced batch over prompt + response sequences, right-padded, starting at position 0.
/// The log-prob of response token `j` of row `r` sits at column `offsets[r] + j`.
pub struct TeacherForced {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub positions: Tensor,
    pub mask: Tensor,
    pub offsets: Vec<usize>,
}

impl TeacherForced {
    /// `seqs`: (prompt, response) pairs, both non-empty.
    pub fn new(seqs: &[(&[u32], &[u32])], pad_id: u32, dev: &Device) -> Result<Self> {
        if let Some(i) = seqs.iter().position(|(p, z)| p.is_empty() || z.is_empty()) {
            bail!("sequence {i}: empty prompt or response");
        }
        let t = seqs.iter().map(|(p, z)| p.len() + z.len() - 1).max().unwrap_or(1);
        let b = seqs.len();
        let (mut inputs, mut targets) = (vec![pad_id; b * t], vec![pad_id; b * t]);
        let mut offsets = Vec::with_capacity(b);
        for (r, (prompt, response)) in seqs.iter().enumerate() {
            let seq: Vec<u32> = prompt.iter().chain(response.iter()).copied().collect();
            let n = seq.len() - 1;
            inputs[r * t..r * t + n].copy_from_slice(&seq[..n]);
            targets[r * t..r * t + n].copy_from_slice(&seq[1..]);
            offsets.push(prompt.len() - 1);
        }
        Ok(Self {
            inputs: Tensor::from_vec(inputs, (b, t), dev)?,
            targets: Tensor::from_vec(targets, (b, t), dev)?,
            positions: Tensor::arange(0u32, t as u32, dev)?.unsqueeze(0)?.expand((b, t))?.contiguous()?,
            mask: qwen2::causal_mask(b, t, dev)?,
            offsets,
        })
    }

    /// Log-probs (b, t) of the targets under `model`.
    pub fn logprobs(&self, model: &Model) -> Result<Tensor> {
        Ok(model.target_logprobs(&self.inputs, &self.positions, &self.mask, &self.targets)?)
    }
}

/// log pi(z_t | prefix) of every response token, `rows` sequences per pass, no gradient.
pub fn response_logprobs(model: &Model, seqs: &[(&[u32], &[u32])], pad_id: u32, rows: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(rows.max(1)) {
        let batch = TeacherForced::new(chunk, pad_id, &model.device())?;
        let logp: Vec<Vec<f32>> = batch.logprobs(model)?.to_vec2()?;
        for (r, (_, response)) in chunk.iter().enumerate() {
            let at = batch.offsets[r];
            out.push(logp[r][at..at + response.len()].to_vec());
        }
    }
    Ok(out)
}

/// A small policy config for tests: vocab 300, context 64, the given shape.
#[cfg(test)]
pub(crate) fn test_config(hidden: usize, ffn: usize, layers: usize, heads: usize, kv_heads: usize) -> Config {
    let shape = ModelShape {
        vocab_size: 300,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        max_position_embeddings: 64,
        ..ModelShape::default()
    };
    tiny_config(&shape, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::qwen2::{causal_mask, padded_mask};
    use candle_core::Var;

    fn small_cfg() -> Config {
        test_config(32, 48, 2, 4, 2)
    }

    fn positions(rows: Vec<Vec<u32>>, dev: &Device) -> Tensor {
        let (b, t) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (b, t), dev).unwrap()
    }

    #[test]
    fn every_trainable_tensor_gets_a_nonzero_gradient() {
        let cfg = small_cfg();
        for dev in crate::kernels::available_devices() {
            let vars: BTreeMap<String, Var> =
                init_weights(&cfg, 1, &dev).unwrap().into_iter().map(|(k, t)| (k, Var::from_tensor(&t).unwrap())).collect();
            let weights: Weights = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
            let model = build_model(&cfg, &weights, &dev).unwrap();
            let tokens = Tensor::from_vec(vec![1u32, 5, 9, 3, 7, 2, 8, 4], (2, 4), &dev).unwrap();
            let pos = positions(vec![vec![0, 1, 2, 3]; 2], &dev);
            let logits = model.forward(&tokens, &pos, &causal_mask(2, 4, &dev).unwrap(), None).unwrap();
            let loss = token_logprobs(&logits, &tokens).unwrap().mean_all().unwrap().neg().unwrap();
            let grads = loss.backward().unwrap();
            assert_eq!(vars.len(), cfg.tensor_shapes().len());
            for (name, var) in &vars {
                let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "{name}: zero gradient");
            }
        }
    }

    #[test]
    fn kv_cached_decode_matches_full_sequence_with_left_padding() {
        let cfg = small_cfg();
        for dev in crate::kernels::available_devices() {
            let model = build_model(&cfg, &init_weights(&cfg, 2, &dev).unwrap(), &dev).unwrap();
            // Row 0: 5 real tokens; row 1: 2 pads then 3 real tokens. Then 3 decoded tokens each.
            let prompt = [vec![3u32, 4, 5, 6, 7], vec![0, 0, 9, 10, 11]];
            let pad = [0usize, 2];
            let next = [vec![12u32, 13, 14], vec![15, 16, 17]];
            let full: Vec<Vec<u32>> = (0..2).map(|r| [prompt[r].clone(), next[r].clone()].concat()).collect();
            let pos_of = |r: usize, slots: std::ops::Range<usize>| -> Vec<u32> { slots.map(|s| s.saturating_sub(pad[r]) as u32).collect() };
            let full_tokens = Tensor::from_vec(full.concat(), (2, 8), &dev).unwrap();
            let full_pos = positions((0..2).map(|r| pos_of(r, 0..8)).collect(), &dev);
            let full_logits = model.forward(&full_tokens, &full_pos, &padded_mask(&pad, 0, 8, &dev).unwrap(), None).unwrap();

            let mut cache = KvCache::new(cfg.num_hidden_layers);
            let prompt_tokens = Tensor::from_vec(prompt.concat(), (2, 5), &dev).unwrap();
            let p = positions((0..2).map(|r| pos_of(r, 0..5)).collect(), &dev);
            let mut step_logits =
                vec![model.forward(&prompt_tokens, &p, &padded_mask(&pad, 0, 5, &dev).unwrap(), Some(&mut cache)).unwrap()];
            for (s, (&a, &b)) in next[0].iter().zip(&next[1]).enumerate() {
                let tok = Tensor::from_vec(vec![a, b], (2, 1), &dev).unwrap();
                let p = positions((0..2).map(|r| pos_of(r, 5 + s..6 + s)).collect(), &dev);
                let mask = padded_mask(&pad, 5 + s, 1, &dev).unwrap();
                step_logits.push(model.forward(&tok, &p, &mask, Some(&mut cache)).unwrap());
            }
            assert_eq!(cache.len(), 8);
            let cached = Tensor::cat(&step_logits, 1).unwrap();
            // Compare only real (non-pad) positions.
            for (r, &p) in pad.iter().enumerate() {
                let a = full_logits.get(r).unwrap().narrow(0, p, 8 - p).unwrap();
                let b = cached.get(r).unwrap().narrow(0, p, 8 - p).unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "row {r}: max abs diff {diff}");
            }
            // A left-padded row gives the same logits as the same tokens unpadded.
            let alone = Tensor::from_vec(full[1][2..].to_vec(), (1, 6), &dev).unwrap();
            let alone_logits =
                model.forward(&alone, &positions(vec![(0..6).collect()], &dev), &causal_mask(1, 6, &dev).unwrap(), None).unwrap();
            let padded = full_logits.get(1).unwrap().narrow(0, 2, 6).unwrap();
            let diff = (alone_logits.get(0).unwrap() - padded).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "padded vs unpadded: {diff}");
        }
    }

    /// The device-generic path (candle's composed ops, what CUDA runs) against the CPU kernels on
    /// the same weights: logits and every parameter's gradient, with biases, GQA and left padding.
    #[test]
    fn generic_path_matches_the_cpu_kernels() {
        let mut cfg = test_config(32, 48, 2, 4, 2);
        cfg.attention_bias = Some(true);
        let dev = Device::Cpu;
        let weights = init_weights(&cfg, 5, &dev).unwrap();
        let tokens = Tensor::from_vec(vec![0u32, 0, 5, 9, 3, 7, 2, 8, 4, 6, 1, 11], (2, 6), &dev).unwrap();
        let pos = positions(vec![vec![0, 0, 0, 1, 2, 3], vec![0, 1, 2, 3, 4, 5]], &dev);
        let mask = padded_mask(&[2, 0], 0, 6, &dev).unwrap();
        let run = || {
            let vars: BTreeMap<String, Var> = weights.iter().map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap())).collect();
            let model = build_model(&cfg, &vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(), &dev).unwrap();
            let logits = model.forward(&tokens, &pos, &mask, None).unwrap();
            let loss = token_logprobs(&logits, &tokens).unwrap().mean_all().unwrap().neg().unwrap();
            let grads = loss.backward().unwrap();
            let grads: BTreeMap<String, Tensor> = vars
                .iter()
                .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{k}: no gradient")).clone()))
                .collect();
            (logits, grads, kernels::cpu_f32(&tokens.to_dtype(DType::F32).unwrap()))
        };
        let (fast_logits, fast_grads, fast_took_kernels) = run();
        let (generic_logits, generic_grads, generic_took_kernels) = kernels::generic(run);
        assert!(fast_took_kernels && !generic_took_kernels, "the switch must select the path");
        assert!(kernels::cpu_f32(&fast_logits), "the switch ends with the closure");
        let max_diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let max_abs = |a: &Tensor| a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_diff(&fast_logits, &generic_logits) < 1e-5);
        assert_eq!(fast_grads.len(), cfg.tensor_shapes().len());
        for (name, g) in &fast_grads {
            let diff = max_diff(g, &generic_grads[name]);
            assert!(diff <= 1e-4 * max_abs(g).max(1e-3), "{name}: gradients differ by {diff} (scale {})", max_abs(g));
        }
    }

    #[test]
    fn packed_inference_matches_the_trainable_model() {
        // Qwen2-style biases, and more rows than one chunk of the packed head's log-probs.
        let mut cfg = test_config(48, 80, 2, 4, 2);
        cfg.attention_bias = Some(true);
        cfg.max_position_embeddings = 200;
        let dev = Device::Cpu;
        let weights = init_weights(&cfg, 4, &dev).unwrap();
        let trainable = build_model(&cfg, &weights, &dev).unwrap();
        let mut packed = build_model(&cfg, &weights, &dev).unwrap();
        packed.pack_for_inference().unwrap();
        let seqs: Vec<Vec<u32>> = (0..3u32).map(|r| (0..150).map(|i| (i * 7 + r * 31) % 300).collect()).collect();
        let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (&s[..5], &s[5..])).collect();
        let batch = TeacherForced::new(&pairs, 0, &dev).unwrap();
        let max_diff =
            |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let logits = |m: &Model| m.forward(&batch.inputs, &batch.positions, &batch.mask, None).unwrap();
        assert!(max_diff(logits(&trainable), logits(&packed)) < 1e-5);
        let want = token_logprobs(&logits(&trainable), &batch.targets).unwrap();
        assert!(max_diff(batch.logprobs(&packed).unwrap(), want) < 1e-5);
    }

    /// The streamed writer gives safetensors' own bytes: names out of order, mixed dtypes, a
    /// non-contiguous view.
    #[test]
    fn streamed_safetensors_are_the_serialized_bytes() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec((0..12).map(|x| x as f32 * 0.5).collect::<Vec<_>>(), (3, 4), &dev).unwrap();
        let b = Tensor::from_vec(vec![1u8, 2, 3], 3, &dev).unwrap();
        let c = Tensor::from_vec(vec![-1.5f32, 2.25], 2, &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let d = Tensor::from_vec(vec![7u32, 8], (1, 2), &dev).unwrap();
        // A transposed view: f32 but not contiguous (written through `data()`).
        let e = a.t().unwrap();
        let tensors = [("z.weight", &a), ("b", &b), ("m.x", &c), ("a.ids", &d), ("c.weight", &a), ("t.weight", &e)];
        let want = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, *t)), None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::new(dir.path());
        let mut staging = store.begin("st").unwrap();
        write_safetensors(&mut staging, "x.safetensors", &tensors, Caching::Cached).unwrap();
        let art = staging.publish(crate::store::Manifest::new("bootstrap", 1, "st", serde_json::json!({}), vec![], 0)).unwrap();
        assert_eq!(std::fs::read(art.file("x.safetensors").unwrap()).unwrap(), want);
    }

    /// The streamed reader gives back what was written (other float dtypes as f32), reads only
    /// what `keep` accepts, and refuses other dtypes, a cut file and trailing bytes.
    #[test]
    fn streamed_reads_round_trip_and_refuse_bad_files() {
        let dev = Device::Cpu;
        let a = Tensor::from_vec((0..300_000).map(|x| (x as f32).sin()).collect::<Vec<_>>(), (600, 500), &dev).unwrap();
        let b = Tensor::from_vec(vec![-1.5f32, 2.25], 2, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, tensors: &[(&str, &Tensor)]| {
            let path = dir.path().join(name);
            std::fs::write(&path, safetensors::serialize(tensors.iter().map(|(n, t)| (*n, *t)), None).unwrap()).unwrap();
            path
        };
        let all = |_: &str| true;
        let good = write("good.safetensors", &[("m.a", &a), ("m.b", &b)]);
        let read: BTreeMap<String, Tensor> = read_safetensors_as_f32(&good, &dev, all).unwrap().into_iter().collect();
        assert_eq!(read.len(), 2);
        assert_eq!(read["m.a"].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(read["m.b"].to_vec1::<f32>().unwrap(), [-1.5, 2.25]);
        let only_b = read_safetensors_as_f32(&good, &dev, |n| n == "m.b").unwrap();
        assert_eq!(only_b.len(), 1);
        assert_eq!(only_b[0].1.to_vec1::<f32>().unwrap(), [-1.5, 2.25]);
        for dtype in [DType::BF16, DType::F16, DType::F64] {
            let other = write("other.safetensors", &[("m.a", &a.to_dtype(dtype).unwrap()), ("m.b", &b.to_dtype(dtype).unwrap())]);
            let read: BTreeMap<String, Tensor> = read_safetensors_as_f32(&other, &dev, all).unwrap().into_iter().collect();
            assert_eq!(read["m.b"].dtype(), DType::F32);
            assert_eq!(read["m.b"].to_vec1::<f32>().unwrap(), [-1.5, 2.25], "{dtype:?}");
            let want = a.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(read["m.a"].to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap(), "{dtype:?}");
        }
        let ints = write("ints.safetensors", &[("m.i", &Tensor::new(&[1u32, 2], &dev).unwrap())]);
        assert!(read_safetensors_as_f32(&ints, &dev, all).unwrap_err().to_string().contains("dtype"));
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
        assert!(read_safetensors_as_f32(&cut, &dev, all).is_err());
        assert!(read_safetensors_as_f32(&cut, &dev, |n| n == "m.a").is_err());
        let long = dir.path().join("long.safetensors");
        std::fs::write(&long, [bytes.as_slice(), &[0u8; 4]].concat()).unwrap();
        assert!(read_safetensors_as_f32(&long, &dev, all).unwrap_err().to_string().contains("after the last tensor"));
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
        assert!(read_safetensors_as_f32(&garbage, &dev, all).is_err());
    }

    #[test]
    fn checkpoint_round_trip_gives_identical_logits() {
        let cfg = small_cfg();
        for dev in crate::kernels::available_devices() {
            let weights = init_weights(&cfg, 3, &dev).unwrap();
            let corpus: Vec<String> = vec!["<think><episode_1>1 + 2 = 3</episode_1></think>\\boxed{3}".into(); 4];
            let tok = tokenizer::train(&corpus, 300).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::Store::new(dir.path());
            let mut staging = store.begin("ckpt").unwrap();
            save_checkpoint(&mut staging, &cfg, &weights, &tok, &tiny_tokenizer_config(64)).unwrap();
            let manifest = crate::store::Manifest::new("bootstrap", 1, "ckpt", serde_json::json!({}), vec![], 0);
            let art = staging.publish(manifest).unwrap();
            let policy = Policy::load(&art, &dev).unwrap();
            assert_eq!(policy.cfg, cfg);
            let original = Policy::from_parts(&cfg, &weights, tok, &dev).unwrap().model;
            let tokens = Tensor::from_vec(vec![1u32, 2, 3], (1, 3), &dev).unwrap();
            let pos = positions(vec![vec![0, 1, 2]], &dev);
            let mask = causal_mask(1, 3, &dev).unwrap();
            let a = original.forward(&tokens, &pos, &mask, None).unwrap();
            let b = policy.model.forward(&tokens, &pos, &mask, None).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0);
        }
    }
}
