//! Learning-rate schedule: linear warm-up, then cosine decay to a floor.

/// Learning rate at `step` (0-based) of `total`: linear warm-up over `warmup` steps to `peak`,
/// then cosine from `peak` down to `floor * peak` at the last step.
pub fn cosine_lr(step: usize, total: usize, warmup: usize, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_middle_and_floor() {
        // 1) warm-up is linear from peak/warmup
        assert!((cosine_lr(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(4, 100, 10, 1.0, 0.1) - 0.5).abs() < 1e-12);
        // 2) the first step after warm-up is the peak
        assert!((cosine_lr(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        // 3) half-way through the decay: floor + (1 - floor) / 2
        assert!((cosine_lr(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        // 4) the end reaches the floor and stays there
        assert!((cosine_lr(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(150, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        // 5) no warm-up
        assert!((cosine_lr(0, 10, 0, 2.0, 0.0) - 2.0).abs() < 1e-12);
    }
}
