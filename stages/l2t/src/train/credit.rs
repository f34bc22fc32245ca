//! Credit assignment (l2t-spec section 7): from episode rewards to per-token advantages.
//!
//! ```text
//! w_t  = -logp_old(z_t) + 1e-6                                  surprise weight
//! r_t  = R(i,k) * w_t / sum_{t' in k} w_t'                      token reward
//! rbar = trimmed mean of {r_t}, central (1 - trim) kept         rollout reward
//! A_i  = (rbar_i - mean_G rbar) / (std_G rbar + 1e-6)           0 for a group with zero spread
//!
//! token_scale = regularised (revised 2026-12-01, default):
//! mu_i    = mean of r_t over the rollout's tokens;   m_i = mean of |r_t|
//! kappa_i = mu_i / (mu_i^2 + (rho * m_i)^2)
//! x_t     = clip(1 + kappa_i * (r_t - mu_i), -c, c)
//! A_t     = A_i * (x_t + 1 - mean_t(x_t))                        A_t = A_i when m_i = 0
//! ```
//!
//! Ablations: `signed` (`A_i clip(r_t / rbar_i, -c, c)`), `rollout` (`A_t = A_i`), `abs`
//! (`A_i clip(r_t / |rbar_i|, -c, c)`, the first reading, which inverts below-average rollouts).

use crate::config::CreditConfig;
use crate::config::{Method, TokenScale};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Length-penalised rewards of a group (Arora & Zanette 2025): each correct response loses up to
/// `a_lp` of its reward by how much longer it is than the group's correct responses on average
/// (z-score over the correct ones, population std); wrong responses keep `r_out`. Correctness
/// comes from the grade, not from `r_out` (a correct answer with the format penalty is correct).
pub fn length_penalty_rewards(r_out: &[f64], correct: &[bool], lens: &[usize], a_lp: f64) -> Vec<f64> {
    let correct_lens: Vec<f64> = correct.iter().zip(lens).filter(|(&ok, _)| ok).map(|(_, &l)| l as f64).collect();
    if correct_lens.is_empty() {
        return r_out.to_vec();
    }
    let n = correct_lens.len() as f64;
    let mean = correct_lens.iter().sum::<f64>() / n;
    let std = (correct_lens.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
    r_out
        .iter()
        .zip(correct)
        .zip(lens)
        .map(|((&r, &ok), &l)| if ok { r * (1.0 - a_lp * sigmoid((l as f64 - mean) / (std + TINY))) } else { r })
        .collect()
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

/// `A_i * clip(r_t / (|rbar_i| + 1e-6), -c, c)` (`abs`) or with the signed ratio (`signed`), and
/// whether the clip bit.
pub fn ratio_token_advantage(a_i: f64, r_t: f64, rbar: f64, c: f64, signed: bool) -> (f64, bool) {
    let ratio = if signed { r_t / (rbar + TINY.copysign(rbar)) } else { r_t / (rbar.abs() + TINY) };
    (a_i * ratio.clamp(-c, c), ratio.abs() > c)
}

/// One rollout's token advantages, with the clip count and whether the `regularised` guard bound.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenAdvantages {
    pub a_t: Vec<f64>,
    pub n_clipped: usize,
    /// `|mu_i| < rho * m_i`: the rollout's mean is too close to 0 for `r_t / mu_i` to mean much,
    /// so its tokens lean towards `A_i` itself (`regularised` only).
    pub guard_binds: bool,
}

/// `regularised` (l2t-spec 7, revised 2026-12-01):
///
/// ```text
/// mu_i    = mean_t r_t;   m_i = mean_t |r_t|
/// kappa_i = mu_i / (mu_i^2 + (rho m_i)^2)
/// x_t     = clip(1 + kappa_i (r_t - mu_i), -c, c)
/// A_t     = A_i (x_t + 1 - mean_t x_t)              A_t = A_i when m_i = 0
/// ```
pub fn regularised_token_advantages(a_i: f64, r_t: &[f64], rho: f64, c: f64) -> TokenAdvantages {
    let n = r_t.len().max(1) as f64;
    let mu = r_t.iter().sum::<f64>() / n;
    let m = r_t.iter().map(|r| r.abs()).sum::<f64>() / n;
    if m == 0.0 {
        return TokenAdvantages { a_t: vec![a_i; r_t.len()], n_clipped: 0, guard_binds: false };
    }
    let kappa = mu / (mu * mu + (rho * m).powi(2));
    let raw: Vec<f64> = r_t.iter().map(|&r| 1.0 + kappa * (r - mu)).collect();
    let n_clipped = raw.iter().filter(|x| x.abs() > c).count();
    let x: Vec<f64> = raw.iter().map(|x| x.clamp(-c, c)).collect();
    let shift = 1.0 - x.iter().sum::<f64>() / n;
    TokenAdvantages { a_t: x.iter().map(|x| a_i * (x + shift)).collect(), n_clipped, guard_binds: mu.abs() < rho * m }
}

/// The token advantages of one rollout under `scale`.
pub fn token_advantages(a_i: f64, r_t: &[f64], rbar: f64, p: &CreditConfig) -> TokenAdvantages {
    let per_token = |signed: bool| {
        let (a_t, clipped): (Vec<f64>, Vec<bool>) = r_t.iter().map(|&r| ratio_token_advantage(a_i, r, rbar, p.clip, signed)).unzip();
        TokenAdvantages { a_t, n_clipped: clipped.iter().filter(|&&b| b).count(), guard_binds: false }
    };
    match p.token_scale {
        TokenScale::Regularised => regularised_token_advantages(a_i, r_t, p.rho, p.clip),
        TokenScale::Signed => per_token(true),
        TokenScale::Abs => per_token(false),
        TokenScale::Rollout => TokenAdvantages { a_t: vec![a_i; r_t.len()], n_clipped: 0, guard_binds: false },
    }
}

/// Whether a rollout's credit is inverted: its mean token advantage has the sign opposite to
/// `A_i` (counted only where `|A_i| > 1e-3`, as the audit query does).
pub fn is_inverted(a_i: f64, a_t: &[f64]) -> bool {
    let mean = a_t.iter().sum::<f64>() / a_t.len().max(1) as f64;
    a_i.abs() > 1e-3 && a_i * mean < 0.0
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
    /// Graded correct and not truncated (for `length-penalty`'s statistics).
    pub correct: bool,
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
    pub guard_binds: bool,
}

/// Credit for one group (the rollouts of one prompt); the bool says the group had zero spread.
pub fn assign_group(group: &[RolloutSignal], p: &CreditConfig) -> (Vec<RolloutCredit>, bool) {
    let w: Vec<Vec<f64>> = group.iter().map(|g| g.logp_old.iter().map(|&lp| surprise_weight(lp)).collect()).collect();
    let r_out: Vec<f64> = group.iter().map(|g| g.r_out).collect();
    // The rollout-level reward of the GRPO-style methods.
    let rollout_reward = match p.method {
        Method::L2t => None,
        Method::Outcome => Some(r_out),
        Method::LengthPenalty => {
            let correct: Vec<bool> = group.iter().map(|g| g.correct).collect();
            Some(length_penalty_rewards(&r_out, &correct, &group.iter().map(|g| g.logp_old.len()).collect::<Vec<_>>(), p.a_lp))
        }
        Method::Mrt => Some(progress_rewards(&r_out, &group.iter().map(|g| g.d_i.clone()).collect::<Vec<_>>(), p.alpha)),
    };
    match rollout_reward {
        None => {
            let r_t: Vec<Vec<f64>> = group
                .iter()
                .zip(&w)
                .map(|(g, w)| g.spans.iter().zip(&g.episode_rewards).flat_map(|(&(s, e), &r)| token_reward(r, &w[s..e])).collect())
                .collect();
            let rbar: Vec<f64> = r_t.iter().map(|r| trimmed_mean(r, p.trim)).collect();
            let (a_i, zero_std) = group_advantage(&rbar);
            let credits = (0..group.len())
                .map(|i| {
                    let t = token_advantages(a_i[i], &r_t[i], rbar[i], p);
                    RolloutCredit {
                        w: w[i].clone(),
                        r_t: r_t[i].clone(),
                        a_t: t.a_t,
                        rbar: rbar[i],
                        a_i: a_i[i],
                        n_clipped: t.n_clipped,
                        guard_binds: t.guard_binds,
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
                    guard_binds: false,
                })
                .collect();
            (credits, zero_std)
        }
    }
}

/// One group of an iteration: its rollouts' signals, and whether its prompt is excluded (a gold
/// answer that cannot be read: every advantage is 0, and the update leaves it out).
pub struct Group {
    pub signals: Vec<RolloutSignal>,
    pub excluded: bool,
}

/// The figures of an iteration's credit that `credit-assign` writes to its manifest.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CreditStats {
    pub groups: usize,
    pub zero_std_groups: usize,
    pub excluded_groups: usize,
    /// Rollouts that carry a signal (not excluded, in a group with spread).
    pub signal_rollouts: usize,
    /// Of those, the ones where the `regularised` guard binds.
    pub guarded: usize,
    /// Of those, the ones whose mean token advantage has the sign opposite to `A_i`.
    pub inverted: usize,
    pub clipped_tokens: usize,
    pub tokens: usize,
}

/// Credit for every group of an iteration, in order: each group's credits and whether it had
/// zero spread, and the iteration's figures.
pub fn assign_iteration(groups: &[Group], p: &CreditConfig) -> (Vec<(Vec<RolloutCredit>, bool)>, CreditStats) {
    let mut stats = CreditStats { groups: groups.len(), ..CreditStats::default() };
    let assigned = groups
        .iter()
        .map(|group| {
            let (mut credits, zero_std) = assign_group(&group.signals, p);
            if group.excluded {
                stats.excluded_groups += 1;
                for credit in &mut credits {
                    credit.a_i = 0.0;
                    credit.a_t.iter_mut().for_each(|a| *a = 0.0);
                }
            } else if zero_std {
                stats.zero_std_groups += 1;
            }
            for credit in &credits {
                stats.clipped_tokens += credit.n_clipped;
                stats.tokens += credit.a_t.len();
                if !group.excluded && !zero_std {
                    stats.signal_rollouts += 1;
                    stats.guarded += usize::from(credit.guard_binds);
                    stats.inverted += usize::from(is_inverted(credit.a_i, &credit.a_t));
                }
            }
            (credits, zero_std)
        })
        .collect();
    (assigned, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iteration_zeroes_excluded_groups_and_counts_what_carries_a_signal() {
        let signal = |r_out: f64| RolloutSignal {
            logp_old: vec![-1.0; 4],
            spans: vec![(0, 2), (2, 4)],
            episode_rewards: vec![r_out / 2.0; 2],
            d_i: vec![0.0; 2],
            r_out,
            correct: r_out > 0.0,
        };
        let p = CreditConfig { method: Method::Outcome, ..CreditConfig::default() };
        let groups = [
            Group { signals: vec![signal(1.0), signal(0.0)], excluded: false },
            Group { signals: vec![signal(1.0), signal(0.0)], excluded: true },
            Group { signals: vec![signal(1.0), signal(1.0)], excluded: false },
        ];
        let (assigned, stats) = assign_iteration(&groups, &p);
        // Group 0: z-scores +-1 over (1, 0); group 1 excluded: all zero; group 2: zero spread.
        assert!((assigned[0].0[0].a_i - 1.0).abs() < 1e-5 && (assigned[0].0[1].a_i + 1.0).abs() < 1e-5);
        assert!(assigned[1].0.iter().all(|c| c.a_i == 0.0 && c.a_t.iter().all(|&a| a == 0.0)));
        assert!(assigned[2].1 && !assigned[0].1);
        let want =
            CreditStats { groups: 3, zero_std_groups: 1, excluded_groups: 1, signal_rollouts: 2, tokens: 24, ..CreditStats::default() };
        assert_eq!(stats, want);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn params(method: Method) -> CreditConfig {
        CreditConfig { method, alpha: 0.8, beta: 0.6, trim: 0.05, clip: 10.0, token_scale: TokenScale::Abs, rho: 0.25, a_lp: 0.2 }
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
    fn ratio_token_advantage_clips_at_c() {
        // ratio 0.2 / 0.1 = 2 -> A_t = 1.5 * 2 (up to the 1e-6).
        let (a, clipped) = ratio_token_advantage(1.5, 0.2, 0.1, 10.0, false);
        assert!((a - 1.5 * 0.2 / (0.1 + 1e-6)).abs() < 1e-12 && !clipped);
        // ratio -5 / |-0.1| = -50 -> clipped to -10.
        let (a, clipped) = ratio_token_advantage(1.5, -5.0, -0.1, 10.0, false);
        assert!(close(a, -15.0) && clipped);
        // A token at its rollout's mean, rbar < 0: abs flips the sign of A_i, signed keeps it.
        let (a, _) = ratio_token_advantage(-2.0, -0.1, -0.1, 10.0, false);
        assert!((a - 2.0 * 0.1 / (0.1 + 1e-6)).abs() < 1e-12);
        let (a, _) = ratio_token_advantage(-2.0, -0.1, -0.1, 10.0, true);
        assert!((a + 2.0 * 0.1 / (0.1 + 1e-6)).abs() < 1e-12);
    }

    #[test]
    fn regularised_is_the_papers_ratio_when_the_mean_is_far_from_zero() {
        // r_t = {0.2, 0.4, 0.6}: mu = 0.4, m = 0.4; rho = 0.001 so (rho m)^2 = 1.6e-7 << mu^2.
        // kappa = 0.4 / (0.16 + 1.6e-7); x_t = 1 + kappa (r_t - 0.4) ~= r_t / 0.4 = {0.5, 1, 1.5},
        // whose mean is 1, so no shift: A_t ~= A_i r_t / mu_i = 2 * {0.5, 1, 1.5}.
        let t = regularised_token_advantages(2.0, &[0.2, 0.4, 0.6], 0.001, 10.0);
        let kappa = 0.4 / (0.16 + 1.6e-7);
        for (a, r) in t.a_t.iter().zip([0.2, 0.4, 0.6]) {
            assert!((a - 2.0 * (1.0 + kappa * (r - 0.4))).abs() < 1e-12, "{t:?}");
            assert!((a - 2.0 * r / 0.4).abs() < 1e-5, "{t:?}");
        }
        assert!(t.n_clipped == 0 && !t.guard_binds);
        // A negative mean keeps the sign: r_t = {-0.1, -0.3}, mu = -0.2 -> x ~= {0.5, 1.5}.
        let t = regularised_token_advantages(-1.0, &[-0.1, -0.3], 0.001, 10.0);
        assert!((t.a_t[0] + 0.5).abs() < 1e-5 && (t.a_t[1] + 1.5).abs() < 1e-5, "{t:?}");
    }

    #[test]
    fn regularised_falls_back_to_a_i_at_a_zero_mean() {
        // mu = 0: kappa = 0, x_t = 1 for every token -> A_t = A_i, and the guard binds.
        let t = regularised_token_advantages(-1.5, &[0.3, -0.3, 0.5, -0.5], 0.25, 10.0);
        assert_eq!(t.a_t, vec![-1.5; 4]);
        assert!(t.guard_binds && t.n_clipped == 0);
        // Every r_t = 0 (m = 0): A_i for every token.
        let t = regularised_token_advantages(0.7, &[0.0; 3], 0.25, 10.0);
        assert_eq!(t.a_t, vec![0.7; 3]);
        assert!(!t.guard_binds);
    }

    #[test]
    fn regularised_mean_is_a_i_with_clipped_tokens() {
        // r_t = {1, 0, 0, 0, 0.01}: mu = 0.202, m = 0.202, rho = 0.25 -> kappa = 0.202 / (0.202^2 (1 + 0.0625))
        // = 4.6597..; x_1 = 1 + kappa * 0.798 = 4.718..; with c = 2 it is clipped to 2.
        let r = [1.0, 0.0, 0.0, 0.0, 0.01];
        let t = regularised_token_advantages(0.8, &r, 0.25, 2.0);
        let kappa = 0.202 / (0.202f64.powi(2) * 1.0625);
        let raw: Vec<f64> = r.iter().map(|&r| 1.0 + kappa * (r - 0.202)).collect();
        assert!(raw[0] > 2.0 && t.n_clipped == 1, "{raw:?} {t:?}");
        let x: Vec<f64> = raw.iter().map(|x| x.clamp(-2.0, 2.0)).collect();
        let shift = 1.0 - x.iter().sum::<f64>() / 5.0;
        for (a, x) in t.a_t.iter().zip(&x) {
            assert!((a - 0.8 * (x + shift)).abs() < 1e-12);
        }
        // The rollout's mean token advantage is exactly A_i.
        assert!((t.a_t.iter().sum::<f64>() / 5.0 - 0.8).abs() < 1e-12);
        assert!(!is_inverted(0.8, &t.a_t));
    }

    #[test]
    fn no_rollout_is_inverted_under_regularised_but_abs_inverts() {
        // A below-average rollout with rbar < 0 (the case that abs inverts).
        let a = RolloutSignal {
            logp_old: vec![-1.0; 3],
            spans: vec![(0, 3)],
            episode_rewards: vec![0.9],
            d_i: vec![0.0],
            r_out: 1.0,
            correct: true,
        };
        let b = RolloutSignal {
            logp_old: vec![-1.0, -2.0],
            spans: vec![(0, 1), (1, 2)],
            episode_rewards: vec![-0.4, 0.1],
            d_i: vec![0.0; 2],
            r_out: 0.0,
            correct: false,
        };
        let mut p = params(Method::L2t);
        let (credits, _) = assign_group(&[a.clone(), b.clone()], &p);
        assert!(credits[1].a_i < 0.0 && is_inverted(credits[1].a_i, &credits[1].a_t), "{credits:?}");
        for scale in [TokenScale::Regularised, TokenScale::Signed, TokenScale::Rollout] {
            p.token_scale = scale;
            let (credits, _) = assign_group(&[a.clone(), b.clone()], &p);
            assert!(credits.iter().all(|c| !is_inverted(c.a_i, &c.a_t)), "{scale:?}: {credits:?}");
        }
        p.token_scale = TokenScale::Rollout;
        let (credits, _) = assign_group(&[a, b], &p);
        assert_eq!(credits[1].a_t, vec![credits[1].a_i; 2]);
    }

    #[test]
    fn l2t_group_by_hand() {
        // Two rollouts of one token per episode, so r_t = R and rbar = mean R (no trimming at 2).
        let a = RolloutSignal {
            logp_old: vec![-1.0, -1.0],
            spans: vec![(0, 1), (1, 2)],
            episode_rewards: vec![0.5, 0.3],
            d_i: vec![0.0; 2],
            r_out: 1.0,
            correct: true,
        };
        let b = RolloutSignal {
            logp_old: vec![-2.0],
            spans: vec![(0, 1)],
            episode_rewards: vec![-0.2],
            d_i: vec![0.0],
            r_out: 0.0,
            correct: false,
        };
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
        let sig = |r_out| RolloutSignal {
            logp_old: vec![-1.0; 3],
            spans: vec![(0, 3)],
            episode_rewards: vec![9.0],
            d_i: vec![0.5],
            r_out,
            correct: r_out > 0.0,
        };
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
        let r = length_penalty_rewards(&[1.0, 1.0, 0.0], &[true, true, false], &[10, 30, 20], 0.2);
        assert!((r[0] - (1.0 - 0.2 * sigmoid(-10.0 / (10.0 + 1e-6)))).abs() < 1e-12);
        assert!((r[1] - 0.853788).abs() < 1e-6 && (r[0] - 0.946212).abs() < 1e-6 && r[2] == 0.0, "{r:?}");
        // One correct response: z = 0, so 1 - 0.2 * 0.5 = 0.9; no correct response: unchanged.
        assert!(close(length_penalty_rewards(&[1.0, 0.0], &[true, false], &[7, 9], 0.2)[0], 0.9));
        assert_eq!(length_penalty_rewards(&[0.0, -0.01], &[false, false], &[7, 9], 0.2), vec![0.0, -0.01]);
        // A correct answer with the format penalty (r_out 0.99) is correct: it is penalised and
        // counts in the statistics. Lengths {10, 30}: as above, times 0.99.
        let r = length_penalty_rewards(&[0.99, 1.0], &[true, true], &[30, 10], 0.2);
        assert!((r[0] - 0.99 * 0.853788).abs() < 1e-6 && (r[1] - 0.946212).abs() < 1e-6, "{r:?}");
        // Then GRPO over those rewards: {0.9, 0} -> +-1.
        let sig = |r_out: f64, n| RolloutSignal {
            logp_old: vec![-1.0; n],
            spans: vec![(0, n)],
            episode_rewards: vec![0.0],
            d_i: vec![0.0],
            r_out,
            correct: r_out > 0.0,
        };
        let (credits, _) = assign_group(&[sig(1.0, 4), sig(0.0, 2)], &params(Method::LengthPenalty));
        assert!(close(credits[0].rbar, 0.9) && (credits[0].a_t[0] - 0.45 / (0.45 + 1e-6)).abs() < 1e-12);
    }

    #[test]
    fn mrt_adds_the_telescoped_progress() {
        // r_out 1 + 0.8 * (0.2 - 0.1 + 0.4) = 1.4; r_out 0 + 0.8 * (-0.25) = -0.2.
        let r = progress_rewards(&[1.0, 0.0], &[vec![0.2, -0.1, 0.4], vec![-0.25]], 0.8);
        assert!(close(r[0], 1.4) && close(r[1], -0.2), "{r:?}");
        let sig = |r_out: f64, d_i: Vec<f64>| RolloutSignal {
            logp_old: vec![-1.0; 2],
            spans: vec![(0, 2)],
            episode_rewards: vec![0.0],
            d_i,
            r_out,
            correct: r_out > 0.0,
        };
        let (credits, zero) = assign_group(&[sig(1.0, vec![0.2, -0.1, 0.4]), sig(0.0, vec![-0.25])], &params(Method::Mrt));
        // {1.4, -0.2}: mean 0.6, std 0.8 -> +-0.8 / (0.8 + 1e-6).
        assert!(!zero && close(credits[0].rbar, 1.4) && (credits[1].a_i + 0.8 / (0.8 + 1e-6)).abs() < 1e-12);
    }
}
