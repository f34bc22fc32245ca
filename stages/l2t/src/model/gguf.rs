//! GGUF checkpoints (llama.cpp): tensors dequantized to f32 and renamed to Hugging Face names,
//! Llama q/k rows un-permuted from llama.cpp's interleaved rotary layout, the byte-level BPE
//! tokenizer rebuilt from the vocabulary and merges with the pre-tokenizer the file names, and the
//! chat template from the metadata.

use super::{Checkpoint, Config, TokenIds, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::Path;

/// Token types in `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's pre-tokenizer regex with case-insensitive contractions, one digit per token (Qwen2).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's: up to three digits per token.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Reads a GGUF file into a checkpoint (f32 weights in Hugging Face naming).
pub fn read(path: &Path, dev: &Device) -> Result<Checkpoint> {
    let origin = path.display().to_string();
    let mut file = std::fs::File::open(path).with_context(|| format!("{origin}: cannot open"))?;
    let content = Content::read(&mut file).map_err(|e| {
        anyhow!(
            "{origin}: not a readable GGUF file: {e} (supported tensor types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)"
        )
    })?;
    let meta = Meta { content: &content, origin: &origin };
    let arch = meta.string("general.architecture")?;
    let (model_type, class) = match arch.as_str() {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
        other => bail!("{origin}: architecture {other:?} is not supported (llama, qwen2, qwen3)"),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta.usize(&key("attention.head_count_kv")).unwrap_or(heads);
    let hidden = meta.usize(&key("embedding_length"))?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let eos = meta.usize("tokenizer.ggml.eos_token_id")? as u32;
    let mut weights = Weights::new();
    for (name, info) in &content.tensor_infos {
        let q = info.read(&mut file, content.tensor_data_offset, dev).with_context(|| format!("{origin}: tensor {name}"))?;
        let mut t = q.dequantize(dev).with_context(|| format!("{origin}: dequantizing {name}"))?;
        let hf_name = hf_name(name).ok_or_else(|| anyhow!("{origin}: tensor {name} has no Hugging Face counterpart"))?;
        if arch == "llama" && name.ends_with("attn_q.weight") {
            t = unpermute(&t, heads)?;
        } else if arch == "llama" && name.ends_with("attn_k.weight") {
            t = unpermute(&t, kv_heads)?;
        }
        weights.insert(hf_name, t);
    }
    let head_dim = meta.usize(&key("attention.key_length")).ok().filter(|&d| d * heads != hidden);
    let cfg = Config {
        architectures: vec![class.into()],
        model_type: model_type.into(),
        vocab_size: weights.get("model.embed_tokens.weight").map_or(tokens.len(), |t| t.dims()[0]),
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: meta.usize(&key("context_length"))?,
        rope_theta: meta.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        tie_word_embeddings: !weights.contains_key("lm_head.weight"),
        attention_bias: Some(weights.contains_key("model.layers.0.self_attn.q_proj.bias")),
        rope_scaling: None,
        bos_token_id: meta.usize("tokenizer.ggml.bos_token_id").ok().map(|b| b as u32),
        eos_token_id: Some(TokenIds::One(eos)),
        torch_dtype: "float32".into(),
        extra: Default::default(),
    };
    let tokenizer = build_tokenizer(&meta, &tokens)?;
    let name_of = |k: &str| meta.usize(k).ok().and_then(|i| tokens.get(i)).cloned();
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
    });
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(tok) = name_of(key) {
            tokenizer_config[field] = json!(tok);
        }
    }
    if let Ok(template) = meta.string("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = json!(template);
    }
    let mut ckpt = Checkpoint { cfg, weights, tokenizer, tokenizer_config };
    ckpt.validate(&origin)?;
    Ok(ckpt)
}

/// Hugging Face name of a GGUF tensor name.
fn hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (kind, param) = rest.split_once('.')?;
    let module = match kind {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{param}"))
}

/// Inverse of llama.cpp's q/k permutation for Llama: its rows hold each head's rotary pairs
/// interleaved (`x0 y0 x1 y1 ..`), Hugging Face's hold the halves (`x0 x1 .. y0 y1 ..`).
pub fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        bail!("cannot un-permute a {rows}x{cols} q/k matrix over {heads} heads");
    }
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// The byte-level BPE tokenizer of a `gpt2`-model GGUF vocabulary, as tokenizer.json.
fn build_tokenizer(meta: &Meta, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("{}: tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")", meta.origin);
    }
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
    let pre = meta.string("tokenizer.ggml.pre").unwrap_or_else(|_| "default".into());
    let byte_level =
        |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre.as_str() {
        "default" | "gpt2" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
        other => bail!("{}: pre-tokenizer {other:?} is not supported (default, gpt2, smollm, qwen2, llama-bpe)", meta.origin),
    };
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, &ty)| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": ty == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        // Qwen2's tokenizer composes Unicode (NFC) before splitting.
        "normalizer": if pre == "qwen2" { json!({"type": "NFC"}) } else { serde_json::Value::Null },
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    spec.to_string().parse::<tokenizers::Tokenizer>().map_err(|e| anyhow!("{}: building the tokenizer: {e}", meta.origin))
}

/// Typed access to the metadata, with errors naming the file and key.
struct Meta<'a> {
    content: &'a Content,
    origin: &'a str,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| anyhow!("{}: metadata {key} is missing", self.origin))
    }

    fn string(&self, key: &str) -> Result<String> {
        Ok(self.get(key)?.to_string().map_err(|e| anyhow!("{}: {key}: {e}", self.origin))?.clone())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x.max(0) as u64));
        Ok(n.map_err(|e| anyhow!("{}: {key}: {e}", self.origin))? as usize)
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|e| anyhow!("{}: {key}: {e}", self.origin))
    }

    fn list(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?.to_vec().map_err(|e| anyhow!("{}: {key}: {e}", self.origin))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.list(key)?.iter().map(|v| Ok(v.to_string().map_err(|e| anyhow!("{}: {key}: {e}", self.origin))?.clone())).collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i32>> {
        self.list(key)?.iter().map(|v| v.to_i32().map_err(|e| anyhow!("{}: {key}: {e}", self.origin))).collect()
    }
}
