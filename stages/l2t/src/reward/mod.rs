//! Rewards (l2t-spec sections 2-6): episodes and the outcome reward ([`segment`]), the fitting
//! information gain ([`info_gain`]), the compression penalty ([`penalty`]), and the episode
//! reward that combines them.

pub mod info_gain;
pub mod penalty;
pub mod prefill;
pub mod segment;

/// `R(i,k) = r_out_i / K_i + alpha * (dI(i,k) - beta * C(i,k))` (spec 6), with `C` as scaled.
pub fn episode_reward(r_out: f64, k_i: usize, d_i: f64, c: f64, alpha: f64, beta: f64) -> f64 {
    r_out / k_i.max(1) as f64 + alpha * (d_i - beta * c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_reward_by_hand() {
        // r_out 1 over K = 4 episodes: 0.25; alpha 0.8 * (0.3 - 0.6 * 0.5) = 0 -> 0.25.
        assert!((episode_reward(1.0, 4, 0.3, 0.5, 0.8, 0.6) - 0.25).abs() < 1e-12);
        // A wrong rollout: 0 + 0.8 * (-0.1 - 0.6 * 2.0) = -1.04.
        assert!((episode_reward(0.0, 2, -0.1, 2.0, 0.8, 0.6) + 1.04).abs() < 1e-12);
    }
}
