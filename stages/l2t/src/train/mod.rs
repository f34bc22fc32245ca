//! Training: credit assignment (l2t-spec 7), the GRPO update (spec 8), the decoder's training pass
//! on the CPU with its backward pass written out, AdamW with exposed state,
//! the learning-rate schedule, the checkpoint state that makes resuming exact, and the supervised
//! warm-up that makes the tiny base policy.

pub mod adamw;
pub mod checkpoint;
pub mod credit;
pub mod decoder_pass;
pub mod grpo;
pub mod schedule;
pub mod sft;
