//! L2T ("Learning to Think", Wang et al., NeurIPS 2025, arXiv 2505.10425): reinforcement
//! fine-tuning with an information-theoretic dense process reward, as a pipeline of small stage
//! binaries over a content-addressed store of Parquet artifacts.
//!
//! Layers, each importing only those above it in this list (a test checks it; see
//! docs/architecture.md):
//!
//! - [`config`]: every knob, typed ([`config::knobs`]), with its default.
//! - [`stage`]: the stage registry: names, versions, the knobs in each key, the iteration order.
//! - [`store`]: keys, hashing writer, atomic publish, manifests, refs, locks, gc, verify.
//! - [`table`]: one module per Parquet table (schema, row struct, write, read, DuckDB view).
//! - [`task`]: the built-in tasks (`arith`, the `decompose` testbed), benchmarks, reading a
//!   response's answer, the grader.
//! - [`kernels`]: the CPU backend's kernels and the one predicate that selects them.
//! - [`model`]: the Qwen2-family decoder, checkpoints (HF, GGUF), tokenizer, chat templates.
//! - [`sampler`]: batched sampling with a KV cache.
//! - [`reward`]: episodes, the outcome reward, `J` and `dI`, the compression penalty.
//! - [`train`]: credit assignment, the GRPO loss and update, AdamW, the schedule, SFT.
//! - [`eval`]: pass@k, accuracy at budgets, confidence intervals.
//! - [`audit`]: the DuckDB views and a run's next iteration.
//! - [`pipeline`]: one module per stage, each the body of its binary.
//! - [`slurm`], [`cli`]: the cluster runner, the binaries' shared command line.

pub mod audit;
pub mod cli;
pub mod config;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod reward;
pub mod sampler;
pub mod slurm;
pub mod stage;
pub mod store;
pub mod table;
pub mod task;
pub mod train;

// candle allocates a fresh buffer for every op; glibc hands large ones back to the kernel at once,
// so each op paid for page faults. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3, as vendored by libmimalloc-sys 0.1.49).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    fn mi_option_set_default(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Keeps freed memory mapped for the life of the process, unless `MIMALLOC_PURGE_DELAY` says
/// otherwise. A training step frees and reallocates the same large activation buffers every
/// micro-batch, seconds apart; mimalloc's default (return them after 1-10 s) made each reuse
/// fault in and zero fresh pages: 10-15% of a SmolLM2 training step. Stages are short-lived
/// processes, so the memory goes back at exit.
pub fn keep_freed_memory() {
    // SAFETY: sets one option of the allocator this crate links, before the stage's work.
    unsafe { mi_option_set_default(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    /// The modules in layer order, as the crate documentation lists them.
    const LAYERS: &[&str] = &[
        "config", "stage", "store", "table", "task", "kernels", "model", "sampler", "reward", "train", "eval", "audit", "pipeline",
        "slurm", "cli",
    ];

    /// The `crate::<module>` paths a source file names outside comments.
    fn imports(text: &str) -> Vec<String> {
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        code.match_indices("crate::")
            .map(|(i, _)| code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
            .collect()
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_module_imports_one_below_it() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let layer = |name: &str| LAYERS.iter().position(|l| *l == name);
        let mut checked = 0;
        for file in files {
            let relative = file.strip_prefix(&src).unwrap();
            let top = relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            let Some(own) = layer(&top) else { continue }; // lib.rs
            for name in imports(&std::fs::read_to_string(&file).unwrap()) {
                if let Some(other) = layer(&name) {
                    assert!(other <= own, "{}: {top} imports {name}, a layer below it", relative.display());
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "only {checked} imports seen");
    }

    /// candle's fused ops that cut the autograd graph without an error (docs/gpu.md): the
    /// `_no_bwd` application of a custom op, and the candle_nn ops built on it.
    const GRADIENT_DROPPING: &[&str] = &[
        "_no_bwd(",
        "softmax_last_dim",
        "ops::rms_norm",
        "ops::layer_norm",
        "rotary_emb::",
        "candle_nn::RmsNorm",
        "candle_nn::LayerNorm",
        "candle_nn::rms_norm",
        "candle_nn::layer_norm",
    ];

    /// The packed inference projections: built only over weights that are not variables, and
    /// taken only by inputs that track no gradient (`gradient_free` in model::qwen2).
    const INFERENCE_ONLY: &str = "kernels/packed.rs";

    /// No path that trains may lose its gradients silently: outside the inference-only module,
    /// no source of the workspace calls a gradient-dropping op.
    #[test]
    fn no_gradient_dropping_op_outside_inference_kernels() {
        let stages = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&stages).unwrap().flatten() {
            if entry.path().join("src").is_dir() {
                sources(&entry.path().join("src"), &mut files);
            }
        }
        let mut allowed_seen = false;
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            // This file names the ops it forbids.
            if file.ends_with("l2t/src/lib.rs") {
                continue;
            }
            for op in GRADIENT_DROPPING {
                if code.contains(op) {
                    if file.ends_with(INFERENCE_ONLY) && *op == "_no_bwd(" {
                        allowed_seen = true;
                        continue;
                    }
                    panic!(
                        "{}: calls {op}, which drops gradients (use the composed ops or a custom op with a backward pass)",
                        file.display()
                    );
                }
            }
        }
        assert!(files.len() > 50, "only {} sources scanned", files.len());
        assert!(allowed_seen, "the scan no longer sees the inference kernels' own _no_bwd call");
    }
}
