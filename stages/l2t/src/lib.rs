//! L2T ("Learning to Think", Wang et al., NeurIPS 2025, arXiv 2505.10425): reinforcement
//! fine-tuning with an information-theoretic dense process reward, as a pipeline of small stage
//! binaries over a content-addressed store of Parquet artifacts.
//!
//! - [`store`]: keys, hashing writer, atomic publish, manifests, refs, gc.
//! - [`table`]: one module per Parquet table (schema, row struct, write, read, DuckDB view).
//! - [`model`]: the Qwen2-family decoder, checkpoints, tokenizer.
//! - [`task`]: the built-in arithmetic task and the grader.
//! - [`reward`]: episodes and the outcome reward.
//! - [`train`]: AdamW, the learning-rate schedule, supervised warm-up.
//! - [`sample`]: batched sampling with a KV cache.
//! - [`eval`]: pass@k and the other evaluation figures.
//! - [`stages`]: one function per stage binary.
//! - [`slurm`]: the cluster runner (an iteration's DAG as Slurm jobs).

pub mod audit;
pub mod cli;
pub mod config;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod reward;
pub mod sample;
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
