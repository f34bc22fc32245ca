//! Evaluation (l2t-spec section 9): `k` samples per held-out prompt, pass@1, unbiased pass@k,
//! response tokens (all / correct), format-valid rate, and accuracy at token budgets (truncate,
//! force `close`, read the answer).

/// Unbiased pass@k of one prompt from `n` samples with `c` correct (Chen et al. 2021):
/// `1 - C(n - c, k) / C(n, k)`, computed as a product to stay exact for large `n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k || n - c < k {
        return if c > 0 { 1.0 } else { 0.0 };
    }
    1.0 - (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
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

/// The figures of one evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub prompts: usize,
    pub k: usize,
    pub pass_at_1: f64,
    pub pass_at_k: f64,
    pub mean_tokens: f64,
    /// Mean tokens of the correct samples (0 when none is correct).
    pub mean_tokens_correct: f64,
    pub format_valid_rate: f64,
    pub accuracy_at_budget: Vec<f64>,
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

    #[test]
    fn summary_by_hand() {
        let s = |n_tokens, correct, format_valid, budget: [bool; 2]| SampleResult { n_tokens, correct, format_valid, correct_at_budget: budget.to_vec() };
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
