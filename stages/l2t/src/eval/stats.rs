//! Confidence intervals over seeds for the comparison report: Student-t intervals of a mean, of a
//! paired difference, and of a ratio (on the log scale, so that it stays positive and a ratio and
//! its inverse get mirrored intervals).

/// `t_{0.975, df}`, the two-sided 95% quantile of Student's t for `df = 1..=30` degrees of
/// freedom (standard table values); beyond 30 the normal 1.96 is within 2%.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093,
    2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// `t_{0.975, df}` (df >= 1).
pub fn t_975(df: usize) -> f64 {
    T_975.get(df.max(1) - 1).copied().unwrap_or(1.96)
}

/// A mean with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    /// Values it comes from.
    pub n: usize,
}

impl Interval {
    /// The interval cut to the values the quantity can take (a rate to `[0, 1]`): a symmetric
    /// t-interval around a rate near 0 or 1 otherwise reaches past them.
    pub fn within(self, lo: f64, hi: f64) -> Self {
        Self { lo: self.lo.clamp(lo, hi), hi: self.hi.clamp(lo, hi), ..self }
    }
}

/// `mean +- t_{0.975, n-1} * s / sqrt(n)` with the sample std `s`; with one value the interval is
/// unbounded (nothing can be said about the spread).
pub fn t_interval(values: &[f64]) -> Interval {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return Interval { mean, lo: f64::NEG_INFINITY, hi: f64::INFINITY, n };
    }
    let s = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    let half = t_975(n - 1) * s / (n as f64).sqrt();
    Interval { mean, lo: mean - half, hi: mean + half, n }
}

/// The paired difference `a_s - b_s` over seeds `s`.
pub fn paired_difference(a: &[f64], b: &[f64]) -> Interval {
    let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
    t_interval(&d)
}

/// The ratio `a_s / b_s` over seeds: a t-interval of `ln(a_s / b_s)`, mapped back by `exp` (the
/// mean is the geometric mean of the ratios).
pub fn ratio_interval(a: &[f64], b: &[f64]) -> Interval {
    let logs: Vec<f64> = a.iter().zip(b).map(|(a, b)| (a / b).ln()).collect();
    let i = t_interval(&logs);
    Interval { mean: i.mean.exp(), lo: i.lo.exp(), hi: i.hi.exp(), n: i.n }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_interval_stays_within_its_range() {
        // Rates 0.95, 1.0, 1.0: mean 0.9833, s = 0.02887, half = 4.303 * 0.02887 / sqrt(3) = 0.0717.
        let i = t_interval(&[0.95, 1.0, 1.0]);
        assert!((i.hi - 1.055).abs() < 1e-3, "{i:?}");
        let r = i.within(0.0, 1.0);
        assert_eq!((r.mean, r.hi, r.n), (i.mean, 1.0, 3));
        assert!((r.lo - i.lo).abs() < 1e-12);
    }

    #[test]
    fn t_interval_by_hand() {
        // {1, 2, 3, 4, 5}: mean 3, s = sqrt(10 / 4) = 1.5811; t_{0.975, 4} = 2.776;
        // half = 2.776 * 1.5811 / sqrt(5) = 1.9630.
        let i = t_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!((i.mean - 3.0).abs() < 1e-12 && (i.hi - 3.0 - 1.96295).abs() < 1e-4 && (3.0 - i.lo - 1.96295).abs() < 1e-4, "{i:?}");
        let one = t_interval(&[0.4]);
        assert!(one.mean == 0.4 && one.lo.is_infinite() && one.hi.is_infinite());
        assert_eq!(t_975(1), 12.706);
        assert_eq!(t_975(100), 1.96);
    }

    #[test]
    fn paired_difference_removes_the_shared_seed_effect() {
        // Each seed moves both arms alike; the differences {0.02, 0.02, 0.02} have no spread.
        let a = [0.52, 0.62, 0.42];
        let b = [0.50, 0.60, 0.40];
        let d = paired_difference(&a, &b);
        assert!((d.mean - 0.02).abs() < 1e-12 && (d.hi - d.lo).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn ratio_interval_is_geometric() {
        // Ratios {0.5, 2}: log ratios {-ln 2, ln 2}, mean 0 -> geometric mean 1; s = ln2 * sqrt(2);
        // half = 12.706 * s / sqrt(2) = 12.706 ln 2, so the bounds are 2^-12.706 and 2^12.706.
        let r = ratio_interval(&[1.0, 4.0], &[2.0, 2.0]);
        assert!((r.mean - 1.0).abs() < 1e-12, "{r:?}");
        assert!((r.hi.ln() - 12.706 * 2f64.ln()).abs() < 1e-9 && (r.lo * r.hi - 1.0).abs() < 1e-9, "{r:?}");
    }
}
