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

pub mod audit;
pub mod cli;
pub mod config;
pub mod eval;
pub mod model;
pub mod reward;
pub mod store;
pub mod table;
pub mod sample;
pub mod stages;
pub mod task;
pub mod train;

// candle allocates a fresh buffer for every op; glibc hands large ones back to the kernel at once,
// so each op paid for page faults. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
