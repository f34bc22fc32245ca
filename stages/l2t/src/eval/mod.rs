//! Evaluation (l2t-spec section 9): `k` samples per held-out prompt, pass@1, unbiased pass@k,
//! response tokens (all / correct), format-valid rate, and accuracy at token budgets (truncate,
//! force `close`, read the answer; a response that answered within the budget keeps its answer,
//! see [`at_budget`]).

pub mod stats;

use crate::table::eval_summary::Summary;

/// Unbiased pass@k of one prompt from `n` samples with `c` correct (Chen et al. 2021):
/// `1 - C(n - c, k) / C(n, k)`, computed as a product to stay exact for large `n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k || n - c < k {
        return if c > 0 { 1.0 } else { 0.0 };
    }
    1.0 - (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// How a sample is graded at a token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtBudget {
    /// The response's own final answer: it ended, or wrote that answer, within the budget.
    Own,
    /// Keep this many response tokens, force `close` and grade the answer the policy then gives.
    Force(usize),
}

/// Where accuracy at `budget` cuts one response of `n_tokens` tokens. `stopped`: it ended with
/// end-of-sequence; `answer_end`: tokens up to the `}` that closes its final answer
/// ([`crate::reward::segment::answer_tokens`]); `reasoning_end`: tokens before its own `</think>`,
/// a final end-of-sequence token excluded (`reasoning_tokens`, as `fisher-reward` cuts for `J`).
///
/// A response whose final answer is complete within the budget is graded on that answer, as if it
/// had stopped there (even when it then ran past `max_new_tokens`). Any other cut lands no later
/// than the response's own `</think>`: cutting after it would append `close` to a closed reasoning
/// (`...</think>\n</think>\n\boxed{`), an out-of-distribution prefix graded wrong whatever the
/// response had worked out.
pub fn at_budget(budget: usize, n_tokens: usize, stopped: bool, answer_end: Option<usize>, reasoning_end: usize) -> AtBudget {
    if (stopped && n_tokens <= budget) || answer_end.is_some_and(|end| end <= budget) {
        AtBudget::Own
    } else {
        AtBudget::Force(budget.min(reasoning_end))
    }
}

/// One evaluated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleResult {
    pub n_tokens: usize,
    pub correct: bool,
    pub format_valid: bool,
    /// Correct when cut at each budget (in the order of the budgets).
    pub correct_at_budget: Vec<bool>,
}

/// Summarises `k` samples per prompt (`samples[prompt][j]`).
pub fn summarize(samples: &[Vec<SampleResult>], k: usize, budgets: usize) -> Summary {
    let all: Vec<&SampleResult> = samples.iter().flatten().collect();
    let n = all.len().max(1) as f64;
    let correct: Vec<&&SampleResult> = all.iter().filter(|s| s.correct).collect();
    let prompts = samples.len().max(1) as f64;
    Summary {
        prompts: samples.len(),
        k,
        pass_at_1: correct.len() as f64 / n,
        pass_at_k: samples.iter().map(|s| pass_at_k(s.len(), s.iter().filter(|r| r.correct).count(), k)).sum::<f64>() / prompts,
        mean_tokens: all.iter().map(|s| s.n_tokens as f64).sum::<f64>() / n,
        mean_tokens_correct: if correct.is_empty() {
            0.0
        } else {
            correct.iter().map(|s| s.n_tokens as f64).sum::<f64>() / correct.len() as f64
        },
        format_valid_rate: all.iter().filter(|s| s.format_valid).count() as f64 / n,
        accuracy_at_budget: (0..budgets).map(|b| all.iter().filter(|s| s.correct_at_budget[b]).count() as f64 / n).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbiased_pass_at_k_by_hand() {
        // n = 4, c = 1, k = 2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
        assert!((pass_at_k(4, 1, 2) - 0.5).abs() < 1e-12);
        // k = 1 is the share correct; c = 0 gives 0; n - c < k gives 1.
        assert!((pass_at_k(8, 3, 1) - 3.0 / 8.0).abs() < 1e-12);
        assert_eq!(pass_at_k(8, 0, 4), 0.0);
        assert_eq!(pass_at_k(4, 3, 2), 1.0);
        // n = 5, c = 2, k = 3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9.
        assert!((pass_at_k(5, 2, 3) - 0.9).abs() < 1e-12);
    }

    /// The counts `at_budget` reads, from a response given as its decoded pieces, the way
    /// `eval` computes them (`eos`: the last piece is the end-of-sequence token).
    fn counts(pieces: &[&str], eos: bool) -> (usize, Option<usize>, usize) {
        use crate::reward::segment::{answer_tokens, reasoning_tokens, token_char_ends};
        let pieces: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
        let (text, ends) = (pieces.concat(), token_char_ends(&pieces));
        (pieces.len(), answer_tokens(&text, &ends), reasoning_tokens(&text, &ends, pieces.len() - usize::from(eos)))
    }

    #[test]
    fn a_response_that_ends_within_the_budget_keeps_its_own_answer() {
        // 0 <think>, 1 a, 2 </think>, 3 \boxed{, 4 3, 5 }, 6 eos: 7 tokens, answer closed in token 5.
        let (n, answer, reasoning) = counts(&["<think>", "a", "</think>", "\\boxed{", "3", "}", ""], true);
        assert_eq!((n, answer, reasoning), (7, Some(6), 2));
        assert_eq!(at_budget(7, n, true, answer, reasoning), AtBudget::Own);
        assert_eq!(at_budget(100, n, true, answer, reasoning), AtBudget::Own);
        // Ended within the budget without an answer: still its own (wrong) outcome, nothing forced.
        let (n, answer, reasoning) = counts(&["<think>", "a", "</think>", "no", ""], true);
        assert_eq!(answer, None);
        assert_eq!(at_budget(5, n, true, answer, reasoning), AtBudget::Own);
    }

    #[test]
    fn reasoning_closed_within_the_budget_is_never_cut_after_its_think_close() {
        // 0 <think>, 1 a, 2 b, 3 </think>, 4 \boxed{, 5 12, 6 }, 7 " then", 8 " more", 9 eos.
        let (n, answer, reasoning) = counts(&["<think>", "a", "b", "</think>", "\\boxed{", "12", "}", " then", " more", ""], true);
        assert_eq!((n, answer, reasoning), (10, Some(7), 3));
        // eos lies past budgets 7 and 8, but the answer closed in token 6: graded as its own.
        assert_eq!(at_budget(7, n, true, answer, reasoning), AtBudget::Own);
        assert_eq!(at_budget(8, n, true, answer, reasoning), AtBudget::Own);
        // Budgets 4 to 6 end after `</think>` (token 3) but inside the answer: cut before `</think>`
        // (3 tokens kept), where `close` continues the reasoning as it does for `J`.
        for budget in 4..=6 {
            assert_eq!(at_budget(budget, n, true, answer, reasoning), AtBudget::Force(3), "budget {budget}");
        }
        // Truncated by max_new_tokens after a complete answer: the answer within budget counts.
        assert_eq!(at_budget(8, n, false, answer, reasoning), AtBudget::Own);
    }

    #[test]
    fn reasoning_still_open_at_the_budget_is_cut_at_the_budget() {
        // 0 <think>, 1 a, 2 b, 3 c, 4 </think>, 5 \boxed{, 6 1, 7 }, 8 eos.
        let (n, answer, reasoning) = counts(&["<think>", "a", "b", "c", "</think>", "\\boxed{", "1", "}", ""], true);
        assert_eq!((n, answer, reasoning), (9, Some(8), 4));
        assert_eq!(at_budget(2, n, true, answer, reasoning), AtBudget::Force(2));
        assert_eq!(at_budget(4, n, true, answer, reasoning), AtBudget::Force(4));
        // Never closed its reasoning and ran out of tokens: cut at the budget, or at its end.
        let (n, answer, reasoning) = counts(&["<think>", "a", "b", "c"], false);
        assert_eq!((answer, reasoning), (None, 4));
        assert_eq!(at_budget(3, n, false, answer, reasoning), AtBudget::Force(3));
        assert_eq!(at_budget(10, n, false, answer, reasoning), AtBudget::Force(4));
    }

    #[test]
    fn summary_by_hand() {
        let s = |n_tokens, correct, format_valid, budget: [bool; 2]| SampleResult {
            n_tokens,
            correct,
            format_valid,
            correct_at_budget: budget.to_vec(),
        };
        // Prompt a: 1 of 2 correct; prompt b: 0 of 2.
        let samples = vec![
            vec![s(10, true, true, [false, true]), s(20, false, true, [false, false])],
            vec![s(30, false, false, [false, false]), s(40, false, true, [true, false])],
        ];
        let sum = summarize(&samples, 2, 2);
        assert_eq!(sum.pass_at_1, 0.25);
        assert_eq!(sum.pass_at_k, 0.5); // a: 1, b: 0
        assert_eq!(sum.mean_tokens, 25.0);
        assert_eq!(sum.mean_tokens_correct, 10.0);
        assert_eq!(sum.format_valid_rate, 0.75);
        assert_eq!(sum.accuracy_at_budget, vec![0.25, 0.25]);
    }
}
