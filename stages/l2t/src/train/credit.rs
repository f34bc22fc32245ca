//! Credit assignment (l2t-spec section 7): from episode rewards to per-token advantages.
//!
//! ```text
//! w_t  = -logp_old(z_t) + 1e-6                                  surprise weight
//! r_t  = R(i,k) * w_t / sum_{t' in k} w_t'                      token reward
//! rbar = trimmed mean of {r_t}, central (1 - trim) kept         rollout reward
//! A_i  = (rbar_i - mean_G rbar) / (std_G rbar + 1e-6)           0 for a group with zero spread
//! A_t  = A_i * clip(r_t / (|rbar_i| + 1e-6), -c, c)
//! ```

use anyhow::{bail, Result};

/// Which signal becomes the advantage (knob `credit.method`). Every method reads the same
/// artifacts, so a baseline is one config change away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Dense L2T credit, steps 1-5 above (default).
    L2t,
    /// GRPO on the outcome reward alone: `A_t = (r_out_i - mean) / (std + 1e-6)`.
    Outcome,
    /// Arora & Zanette: `r_i = r_out_i (1 - a_lp sigmoid((len_i - mean_c) / std_c))` over the
    /// group's correct responses, then GRPO.
    LengthPenalty,
    /// MRT-style progress bonus: `r_i = r_out_i + alpha sum_k dI(i,k)`, then GRPO.
    Mrt,
}

impl Method {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "l2t" => Ok(Self::L2t),
            "outcome" => Ok(Self::Outcome),
            "length-penalty" => Ok(Self::LengthPenalty),
            "mrt" => Ok(Self::Mrt),
            other => bail!("unknown credit method {other:?} (expected l2t, outcome, length-penalty or mrt)"),
        }
    }
}

/// The knobs credit assignment reads (section `[credit]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CreditParams {
    pub method: Method,
    /// Weight of the progress bonus (`mrt`; `l2t` applies it inside `R(i,k)`).
    pub alpha: f64,
    pub trim: f64,
    /// `c`.
    pub clip: f64,
    pub token_scale: TokenScale,
    /// `a_lp` of `length-penalty`.
    pub a_lp: f64,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Length-penalised rewards of a group (Arora & Zanette 2025): each correct response loses up to
/// `a_lp` of its reward by how much longer it is than the group's correct responses on average
/// (z-score over the correct ones, population std); wrong responses keep `r_out`.
pub fn length_penalty_rewards(r_out: &[f64], lens: &[usize], a_lp: f64) -> Vec<f64> {
    let correct: Vec<f64> = r_out.iter().zip(lens).filter(|(&r, _)| r >= 1.0).map(|(_, &l)| l as f64).collect();
    if correct.is_empty() {
        return r_out.to_vec();
    }
    let mean = correct.iter().sum::<f64>() / correct.len() as f64;
    let std = (correct.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / correct.len() as f64).sqrt();
    r_out.iter().zip(lens).map(|(&r, &l)| r * (1.0 - a_lp * sigmoid((l as f64 - mean) / (std + TINY)))).collect()
}

/// MRT-style rewards: `r_out_i + alpha * sum_k dI(i,k)` (the sum telescopes to `J(i,K) - J(i,0)`).
pub fn progress_rewards(r_out: &[f64], d_i: &[Vec<f64>], alpha: f64) -> Vec<f64> {
    r_out.iter().zip(d_i).map(|(&r, d)| r + alpha * d.iter().sum::<f64>()).collect()
}

/// Added to the surprise weight and to the denominators, as in the spec.
pub const TINY: f64 = 1e-6;

/// `w_t = -logp_old(z_t) + 1e-6`.
pub fn surprise_weight(logp_old: f32) -> f64 {
    -f64::from(logp_old) + TINY
}

/// `r_t = R(i,k) * w_t / sum_{t' in k} w_t'` for the tokens of one episode: they sum to `R(i,k)`.
pub fn token_reward(r_episode: f64, w: &[f64]) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    w.iter().map(|&w_t| r_episode * w_t / total).collect()
}

/// Symmetric trimmed mean: drops `floor(n * trim / 2)` values from each end (always keeping at
/// least one) and averages the rest.
pub fn trimmed_mean(values: &[f64], trim: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let cut = ((n as f64 * trim / 2.0).floor() as usize).min((n - 1) / 2);
    let kept = &sorted[cut..n - cut];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// Group z-scores `(x - mean) / (std + 1e-6)` with the population std; a group whose values are
/// all equal gets zeros and `true` (counted in `frac_zero_std`).
pub fn group_advantage(values: &[f64]) -> (Vec<f64>, bool) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.iter().all(|&v| v == values[0]) {
        return (vec![0.0; values.len()], true);
    }
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    (values.iter().map(|v| (v - mean) / (std + TINY)).collect(), false)
}

/// How a token's reward is compared with its rollout's (knob `credit.token_scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScale {
    /// `r_t / (|rbar_i| + 1e-6)`, as l2t-spec 7 writes it. When `rbar_i < 0` the ratio of a
    /// typical token is -1, so `A_t` takes the sign opposite to `A_i`.
    Abs,
    /// `r_t / (rbar_i +- 1e-6)`: a typical token's ratio is +1 whatever the sign of `rbar_i`, so
    /// the tokens' mean advantage stays near `A_i`.
    Signed,
}

impl TokenScale {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "abs" => Ok(Self::Abs),
            "signed" => Ok(Self::Signed),
            other => bail!("unknown token_scale {other:?} (expected abs or signed)"),
        }
    }
}

/// `A_t = A_i * clip(r_t / (|rbar_i| + 1e-6), -c, c)` (or the signed ratio), and whether the
/// clip bit.
pub fn token_advantage(a_i: f64, r_t: f64, rbar: f64, c: f64, scale: TokenScale) -> (f64, bool) {
    let ratio = match scale {
        TokenScale::Abs => r_t / (rbar.abs() + TINY),
        TokenScale::Signed => r_t / (rbar + TINY.copysign(rbar)),
    };
    (a_i * ratio.clamp(-c, c), ratio.abs() > c)
}

/// What credit assignment needs of one rollout.
#[derive(Debug, Clone)]
pub struct RolloutSignal {
    /// Sampler log-probs, one per response token.
    pub logp_old: Vec<f32>,
    /// Episode spans partitioning the response.
    pub spans: Vec<(usize, usize)>,
    /// `R(i,k)` per episode (for `l2t`).
    pub episode_rewards: Vec<f64>,
    /// `dI(i,k)` per episode (for `mrt`).
    pub d_i: Vec<f64>,
    pub r_out: f64,
}

/// One rollout's credit.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutCredit {
    pub w: Vec<f64>,
    pub r_t: Vec<f64>,
    pub a_t: Vec<f64>,
    pub rbar: f64,
    pub a_i: f64,
    pub n_clipped: usize,
}

/// Credit for one group (the rollouts of one prompt); the bool says the group had zero spread.
pub fn assign_group(group: &[RolloutSignal], p: &CreditParams) -> (Vec<RolloutCredit>, bool) {
    let w: Vec<Vec<f64>> = group.iter().map(|g| g.logp_old.iter().map(|&lp| surprise_weight(lp)).collect()).collect();
    let (trim, c, scale) = (p.trim, p.clip, p.token_scale);
    let r_out: Vec<f64> = group.iter().map(|g| g.r_out).collect();
    // The rollout-level reward of the GRPO-style methods.
    let rollout_reward = match p.method {
        Method::L2t => None,
        Method::Outcome => Some(r_out),
        Method::LengthPenalty => Some(length_penalty_rewards(&r_out, &group.iter().map(|g| g.logp_old.len()).collect::<Vec<_>>(), p.a_lp)),
        Method::Mrt => Some(progress_rewards(&r_out, &group.iter().map(|g| g.d_i.clone()).collect::<Vec<_>>(), p.alpha)),
    };
    match rollout_reward {
        None => {
            let r_t: Vec<Vec<f64>> = group
                .iter()
                .zip(&w)
                .map(|(g, w)| g.spans.iter().zip(&g.episode_rewards).flat_map(|(&(s, e), &r)| token_reward(r, &w[s..e])).collect())
                .collect();
            let rbar: Vec<f64> = r_t.iter().map(|r| trimmed_mean(r, trim)).collect();
            let (a_i, zero_std) = group_advantage(&rbar);
            let credits = (0..group.len())
                .map(|i| {
                    let (a_t, clipped): (Vec<f64>, Vec<bool>) =
                        r_t[i].iter().map(|&r| token_advantage(a_i[i], r, rbar[i], c, scale)).unzip();
                    RolloutCredit {
                        w: w[i].clone(),
                        r_t: r_t[i].clone(),
                        n_clipped: clipped.iter().filter(|&&b| b).count(),
                        a_t,
                        rbar: rbar[i],
                        a_i: a_i[i],
                    }
                })
                .collect();
            (credits, zero_std)
        }
        Some(r_i) => {
            let (a_i, zero_std) = group_advantage(&r_i);
            let credits = (0..group.len())
                .map(|i| RolloutCredit {
                    w: w[i].clone(),
                    r_t: vec![0.0; w[i].len()],
                    a_t: vec![a_i[i]; w[i].len()],
                    rbar: r_i[i],
                    a_i: a_i[i],
                    n_clipped: 0,
                })
                .collect();
            (credits, zero_std)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn params(method: Method) -> CreditParams {
        CreditParams { method, alpha: 0.8, trim: 0.05, clip: 10.0, token_scale: TokenScale::Abs, a_lp: 0.2 }
    }

    #[test]
    fn surprise_weights_and_token_rewards_sum_to_the_episode_reward() {
        // logp_old = ln 0.5, ln 0.25 -> w = 0.693147.. + 1e-6, 1.386294.. + 1e-6.
        let w: Vec<f64> = [0.5f32.ln(), 0.25f32.ln()].iter().map(|&l| surprise_weight(l)).collect();
        assert!((w[0] - (2f64.ln() + 1e-6)).abs() < 1e-6 && (w[1] - (4f64.ln() + 1e-6)).abs() < 1e-6);
        // R = 0.9 split 1:2 by surprise: 0.3 and 0.6.
        let r = token_reward(0.9, &[1.0, 2.0]);
        assert!(close(r[0], 0.3) && close(r[1], 0.6), "{r:?}");
        assert!(close(token_reward(-0.7, &w).iter().sum(), -0.7));
    }

    #[test]
    fn trimmed_mean_drops_the_tails() {
        // 40 values 1..=40: trim 0.05 drops one from each end -> mean of 2..=39 = 20.5; the outlier
        // 1000 in place of 40 is dropped too.
        let mut v: Vec<f64> = (1..=40).map(f64::from).collect();
        assert!(close(trimmed_mean(&v, 0.05), 20.5));
        v[39] = 1000.0;
        assert!(close(trimmed_mean(&v, 0.05), 20.5));
        // Fewer than 40 values at 5%: nothing is dropped.
        assert!(close(trimmed_mean(&[1.0, 2.0, 9.0], 0.05), 4.0));
        // trim 1.0 keeps the median.
        assert!(close(trimmed_mean(&[1.0, 2.0, 9.0], 1.0), 2.0));
    }

    #[test]
    fn group_z_score_and_zero_spread() {
        // {1, 0, 0, 1}: mean 0.5, population std 0.5 -> +-1 (less the 1e-6 in the denominator).
        let (a, zero) = group_advantage(&[1.0, 0.0, 0.0, 1.0]);
        assert!(!zero);
        assert!((a[0] - 0.5 / (0.5 + 1e-6)).abs() < 1e-12 && (a[1] + 0.5 / (0.5 + 1e-6)).abs() < 1e-12);
        let (a, zero) = group_advantage(&[0.3, 0.3, 0.3]);
        assert!(zero && a == vec![0.0; 3]);
    }

    #[test]
    fn token_advantage_clips_at_c() {
        // ratio 0.2 / 0.1 = 2 -> A_t = 1.5 * 2 (up to the 1e-6).
        let (a, clipped) = token_advantage(1.5, 0.2, 0.1, 10.0, TokenScale::Abs);
        assert!((a - 1.5 * 0.2 / (0.1 + 1e-6)).abs() < 1e-12 && !clipped);
        // ratio -5 / |-0.1| = -50 -> clipped to -10.
        let (a, clipped) = token_advantage(1.5, -5.0, -0.1, 10.0, TokenScale::Abs);
        assert!(close(a, -15.0) && clipped);
        // A token at its rollout's mean, rbar < 0: abs flips the sign of A_i, signed keeps it.
        let (a, _) = token_advantage(-2.0, -0.1, -0.1, 10.0, TokenScale::Abs);
        assert!((a - 2.0 * 0.1 / (0.1 + 1e-6)).abs() < 1e-12);
        let (a, _) = token_advantage(-2.0, -0.1, -0.1, 10.0, TokenScale::Signed);
        assert!((a + 2.0 * 0.1 / (0.1 + 1e-6)).abs() < 1e-12);
    }

    #[test]
    fn l2t_group_by_hand() {
        // Two rollouts of one token per episode, so r_t = R and rbar = mean R (no trimming at 2).
        let a = RolloutSignal { logp_old: vec![-1.0, -1.0], spans: vec![(0, 1), (1, 2)], episode_rewards: vec![0.5, 0.3], d_i: vec![0.0; 2], r_out: 1.0 };
        let b = RolloutSignal { logp_old: vec![-2.0], spans: vec![(0, 1)], episode_rewards: vec![-0.2], d_i: vec![0.0], r_out: 0.0 };
        let (credits, zero) = assign_group(&[a, b], &params(Method::L2t));
        assert!(!zero);
        assert_eq!(credits[0].r_t, vec![0.5, 0.3]);
        assert!(close(credits[0].rbar, 0.4) && close(credits[1].rbar, -0.2));
        // rbar {0.4, -0.2}: mean 0.1, std 0.3 -> A = +-0.3 / (0.3 + 1e-6).
        let a_i = 0.3 / (0.3 + 1e-6);
        assert!(close(credits[0].a_i, a_i) && close(credits[1].a_i, -a_i));
        // A_t = A_i * r_t / |rbar|: 0.5 / 0.4 and 0.3 / 0.4; rollout b: -0.2 / 0.2 = -1 -> +A_i.
        assert!((credits[0].a_t[0] - a_i * 0.5 / (0.4 + 1e-6)).abs() < 1e-9);
        assert!((credits[0].a_t[1] - a_i * 0.3 / (0.4 + 1e-6)).abs() < 1e-9);
        assert!((credits[1].a_t[0] - a_i * 0.2 / (0.2 + 1e-6)).abs() < 1e-9);
    }

    #[test]
    fn outcome_method_is_grpo() {
        let sig = |r_out| RolloutSignal { logp_old: vec![-1.0; 3], spans: vec![(0, 3)], episode_rewards: vec![9.0], d_i: vec![0.5], r_out };
        let (credits, zero) = assign_group(&[sig(1.0), sig(0.0)], &params(Method::Outcome));
        assert!(!zero);
        let a = 0.5 / (0.5 + 1e-6);
        assert_eq!(credits[0].a_t, vec![a; 3]);
        assert_eq!(credits[1].a_t, vec![-a; 3]);
        let (credits, zero) = assign_group(&[sig(0.0), sig(0.0)], &params(Method::Outcome));
        assert!(zero && credits[0].a_t == vec![0.0; 3]);
    }

    #[test]
    fn length_penalty_by_hand() {
        // Correct lengths 10 and 30: mean 20, population std 10. The 30-token one: z = 1 (up to
        // the 1e-6), reward 1 - 0.2 * sigmoid(1) = 1 - 0.2 * 0.731059 = 0.853788; the 10-token one
        // 1 - 0.2 * sigmoid(-1) = 0.946212. The wrong one keeps 0.
        let r = length_penalty_rewards(&[1.0, 1.0, 0.0], &[10, 30, 20], 0.2);
        assert!((r[0] - (1.0 - 0.2 * sigmoid(-10.0 / (10.0 + 1e-6)))).abs() < 1e-12);
        assert!((r[1] - 0.853788).abs() < 1e-6 && (r[0] - 0.946212).abs() < 1e-6 && r[2] == 0.0, "{r:?}");
        // One correct response: z = 0, so 1 - 0.2 * 0.5 = 0.9; no correct response: unchanged.
        assert!(close(length_penalty_rewards(&[1.0, 0.0], &[7, 9], 0.2)[0], 0.9));
        assert_eq!(length_penalty_rewards(&[0.0, -0.01], &[7, 9], 0.2), vec![0.0, -0.01]);
        // Then GRPO over those rewards: {0.9, 0} -> +-1.
        let sig = |r_out, n| RolloutSignal { logp_old: vec![-1.0; n], spans: vec![(0, n)], episode_rewards: vec![0.0], d_i: vec![0.0], r_out };
        let (credits, _) = assign_group(&[sig(1.0, 4), sig(0.0, 2)], &params(Method::LengthPenalty));
        assert!(close(credits[0].rbar, 0.9) && (credits[0].a_t[0] - 0.45 / (0.45 + 1e-6)).abs() < 1e-12);
    }

    #[test]
    fn mrt_adds_the_telescoped_progress() {
        // r_out 1 + 0.8 * (0.2 - 0.1 + 0.4) = 1.4; r_out 0 + 0.8 * (-0.25) = -0.2.
        let r = progress_rewards(&[1.0, 0.0], &[vec![0.2, -0.1, 0.4], vec![-0.25]], 0.8);
        assert!(close(r[0], 1.4) && close(r[1], -0.2), "{r:?}");
        let sig = |r_out, d_i: Vec<f64>| RolloutSignal { logp_old: vec![-1.0; 2], spans: vec![(0, 2)], episode_rewards: vec![0.0], d_i, r_out };
        let (credits, zero) = assign_group(&[sig(1.0, vec![0.2, -0.1, 0.4]), sig(0.0, vec![-0.25])], &params(Method::Mrt));
        // {1.4, -0.2}: mean 0.6, std 0.8 -> +-0.8 / (0.8 + 1e-6).
        assert!(!zero && close(credits[0].rbar, 1.4) && (credits[1].a_i + 0.8 / (0.8 + 1e-6)).abs() < 1e-12);
    }
}
