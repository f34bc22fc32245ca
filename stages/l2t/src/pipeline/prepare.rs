//! `prepare`: the task's train, validation and test splits.

use super::{execute, Ctx, Summary};
use crate::stage::Stage;
use crate::table::prompts;
use crate::task::{self, Splits};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// `prepare`: the built-in task's train, eval (validation) and test splits.
pub fn run_prepare(ctx: &Ctx) -> Result<Summary> {
    let cfg = &ctx.config;
    let mut params = Stage::Prepare.params(cfg);
    let eval_file = cfg.task.eval_file.as_deref();
    if let Some(path) = eval_file {
        params["eval_file_blake3"] = content_hash(path)?.into();
    }
    execute(ctx, Stage::Prepare, Stage::Prepare.name(), params, vec![], |staging| {
        let Splits { train, mut eval, test } = task::generate(&cfg.task, cfg.seed)?;
        if let Some(path) = eval_file {
            eval = prompts::read(path).with_context(|| format!("task.eval_file {}", path.display()))?;
            if eval.is_empty() {
                bail!("task.eval_file {}: no prompts", path.display());
            }
        }
        prompts::write(staging, prompts::TRAIN_FILE, &train)?;
        prompts::write(staging, prompts::EVAL_FILE, &eval)?;
        prompts::write(staging, prompts::TEST_FILE, &test)?;
        let mean_redundant = train.iter().map(|r| f64::from(r.n_redundant)).sum::<f64>() / train.len() as f64;
        Ok(serde_json::json!({
            "train_rows": train.len(),
            "eval_rows": eval.len(),
            "test_rows": test.len(),
            "train_mean_redundant": mean_redundant,
        }))
    })
}

/// blake3 of a file, or of a directory's files (names and contents, in name order).
pub(super) fn content_hash(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("bootstrap.source {}: cannot open", f.display()))?;
        hasher.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        hasher.update_reader(&mut file).with_context(|| format!("{}: cannot read", f.display()))?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}
