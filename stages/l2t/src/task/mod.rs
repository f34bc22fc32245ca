//! Tasks: the built-in synthetic arithmetic task, the real benchmarks, and the answer grader.

pub mod arith;
pub mod benchmarks;
pub mod grade;

/// Opening of the reasoning block.
pub const THINK_OPEN: &str = "<think>";
/// End of the reasoning block; the final answer follows it.
pub const THINK_CLOSE: &str = "</think>";
/// Opening of the final-answer box.
pub const BOXED_OPEN: &str = "\\boxed{";

/// `<episode_k>`.
pub fn episode_open(k: usize) -> String {
    format!("<episode_{k}>")
}

/// `</episode_k>`.
pub fn episode_close(k: usize) -> String {
    format!("</episode_{k}>")
}
