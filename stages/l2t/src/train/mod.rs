//! Training: AdamW with exposed state, the learning-rate schedule, gradient clipping, and the
//! supervised warm-up that makes the tiny base policy.

pub mod adamw;
pub mod schedule;
pub mod sft;
