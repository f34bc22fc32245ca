//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json` (special tokens and the
//! chat template), `generation_config.json`.

use super::{Config, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// A checkpoint in memory: what a Hugging Face directory or a GGUF file holds.
pub struct Checkpoint {
    pub cfg: Config,
    pub weights: Weights,
    pub tokenizer: tokenizers::Tokenizer,
    /// tokenizer_config.json as read (special tokens, `chat_template`), written back unchanged.
    pub tokenizer_config: serde_json::Value,
}

impl Checkpoint {
    /// The checkpoint's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        chat_template(&self.tokenizer_config)
    }

    /// Refuses a checkpoint whose parts disagree: weights missing or shaped otherwise than
    /// config.json says, a tokenizer with ids beyond the embedding's rows. Extra tensors are an
    /// error too, except a head that a tied config ignores.
    pub fn validate(&mut self, origin: &str) -> Result<()> {
        self.cfg.validate().map_err(|e| anyhow!("{origin}: {e}"))?;
        let expected = self.cfg.tensor_shapes();
        if self.cfg.tie_word_embeddings {
            self.weights.remove("lm_head.weight");
        }
        for (name, shape) in &expected {
            let Some(t) = self.weights.get(name) else {
                bail!("{origin}: weight {name} is missing (config.json expects shape {shape:?})");
            };
            if t.dims() != shape.as_slice() {
                bail!("{origin}: config.json and the weights disagree: {name} has shape {:?}, the config implies {shape:?}", t.dims());
            }
        }
        let names: BTreeSet<&String> = expected.iter().map(|(n, _)| n).collect();
        if let Some(extra) = self.weights.keys().find(|k| !names.contains(k)) {
            bail!("{origin}: weight {extra} is not part of a {} model with this config", self.cfg.model_type);
        }
        let tok_size = self.tokenizer.get_vocab_size(true);
        if tok_size > self.cfg.vocab_size {
            bail!(
                "{origin}: the tokenizer has {tok_size} tokens but the model's embedding has {} rows (mismatched tokenizer and model)",
                self.cfg.vocab_size
            );
        }
        Ok(())
    }
}

/// `chat_template` of a tokenizer_config.json (a string, or the list-of-named-templates form).
pub fn chat_template(tokenizer_config: &serde_json::Value) -> Option<&str> {
    match tokenizer_config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Array(list) => {
            list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default")).and_then(|t| t.get("template")?.as_str())
        }
        _ => None,
    }
}

/// Reads a checkpoint whose files are found by `locate` (None: the file is absent), so the same
/// code loads a plain directory and a verified store artifact.
pub fn read(origin: &str, locate: impl Fn(&str) -> Result<Option<PathBuf>>, dev: &Device) -> Result<Checkpoint> {
    let cfg = read_config(origin, &locate)?;
    let tok_path = need(origin, &locate, TOKENIZER_FILE)?;
    let tokenizer_config = match locate(TOKENIZER_CONFIG_FILE)? {
        Some(p) => serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("{}: not JSON", p.display()))?,
        None => serde_json::json!({}),
    };
    // The tokenizer's JSON parses on one core (~50 ms for a 49k vocabulary) while the weights
    // are read.
    let (tokenizer, weights) = std::thread::scope(|scope| {
        let tokenizer = scope.spawn(|| {
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", tok_path.display()))
        });
        let weights = read_weights(origin, &locate, dev, |_| true);
        (tokenizer.join().map_err(|_| anyhow!("{}: the tokenizer's parse panicked", tok_path.display())), weights)
    });
    let (tokenizer, weights) = (tokenizer??, weights?);
    let mut ckpt = Checkpoint { cfg, weights, tokenizer, tokenizer_config };
    ckpt.validate(origin)?;
    Ok(ckpt)
}

/// config.json and the named tensors alone of a checkpoint found by `locate` (the others are
/// skipped unread), for a stage that needs a few tensors of another policy.
pub fn read_tensors(
    origin: &str,
    locate: impl Fn(&str) -> Result<Option<PathBuf>>,
    dev: &Device,
    names: &[String],
) -> Result<(Config, Weights)> {
    let cfg = read_config(origin, &locate)?;
    let weights = read_weights(origin, &locate, dev, |name| names.iter().any(|n| n == name))?;
    if let Some(missing) = names.iter().find(|n| !weights.contains_key(*n)) {
        bail!("{origin}: no weight {missing}");
    }
    Ok((cfg, weights))
}

fn need(origin: &str, locate: &impl Fn(&str) -> Result<Option<PathBuf>>, file: &str) -> Result<PathBuf> {
    locate(file)?.ok_or_else(|| anyhow!("{origin}: no {file}"))
}

fn read_config(origin: &str, locate: &impl Fn(&str) -> Result<Option<PathBuf>>) -> Result<Config> {
    let cfg_path = need(origin, locate, CONFIG_FILE)?;
    let mut cfg: Config = serde_json::from_slice(&std::fs::read(&cfg_path)?)
        .with_context(|| format!("{}: not a supported config.json", cfg_path.display()))?;
    cfg.resolve_rope_theta();
    cfg.validate().map_err(|e| anyhow!("{}: {e}", cfg_path.display()))?;
    Ok(cfg)
}

/// A Hugging Face checkpoint directory.
pub fn read_dir(dir: &Path, dev: &Device) -> Result<Checkpoint> {
    if !dir.is_dir() {
        bail!("{}: not a checkpoint directory", dir.display());
    }
    read(&dir.display().to_string(), |f| Ok(Some(dir.join(f)).filter(|p| p.exists())), dev)
}

/// The weights `keep` accepts, in f32: from one safetensors file, or the shards a
/// `model.safetensors.index.json` names.
fn read_weights(
    origin: &str,
    locate: &impl Fn(&str) -> Result<Option<PathBuf>>,
    dev: &Device,
    keep: impl Fn(&str) -> bool,
) -> Result<Weights> {
    let files: Vec<PathBuf> = if let Some(p) = locate(WEIGHTS_FILE)? {
        vec![p]
    } else if let Some(index) = locate(WEIGHTS_INDEX_FILE)? {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index)?).with_context(|| format!("{}: not JSON", index.display()))?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.into_iter().map(|s| locate(s)?.ok_or_else(|| anyhow!("{}: shard {s} is missing", index.display()))).collect::<Result<_>>()?
    } else {
        bail!("{origin}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}");
    };
    let mut weights = Weights::new();
    for path in files {
        let loaded =
            super::read_safetensors_as_f32(&path, dev, &keep).with_context(|| format!("{}: cannot read the weights", path.display()))?;
        weights.extend(loaded);
    }
    Ok(weights)
}
