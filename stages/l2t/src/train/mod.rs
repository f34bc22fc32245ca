//! Training: credit assignment (l2t-spec 7), the GRPO update (spec 8), AdamW with exposed state,
//! the learning-rate schedule, the checkpoint state that makes resuming exact, and the supervised
//! warm-up that makes the tiny base policy.

pub mod adamw;
pub mod checkpoint;
pub mod credit;
pub mod grpo;
pub mod schedule;
pub mod sft;
