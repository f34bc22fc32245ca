//! Vectorised exponentials: log-sum-exp and softmax rows, the sampling weights exp((l - max) / T)
//! and the MLP's silu gate. libm's scalar `expf` costs a few nanoseconds a value (far more on an
//! underflow), which over vocabulary rows, attention rows and MLP activations was a large share
//! of a decode step or a scoring pass.

/// Largest value of a row (-inf for an empty row).
pub fn max(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// log sum_i exp(row[i]).
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let m = max(row);
    if !m.is_finite() {
        return m;
    }
    m + exp_scaled(row, m, 1.0, None).ln()
}

/// Writes exp((row[i] - shift) * scale) into `out` (when given; at least as long as `row`) and
/// returns their sum.
pub fn exp_scaled(row: &[f32], shift: f32, scale: f32, out: Option<&mut [f32]>) -> f32 {
    if let Some(out) = &out {
        assert!(out.len() >= row.len(), "exp_scaled: {} outputs for {} values", out.len(), row.len());
    }
    let out = out.map_or(std::ptr::null_mut(), |o| o.as_mut_ptr());
    // SAFETY: `row.len()` values are read from `row` and, when `out` is not null, written to
    // `out`, which holds at least as many (asserted above) and, a unique borrow, overlaps nothing.
    unsafe { exp_scaled_raw(row.as_ptr(), row.len(), shift, scale, out) }
}

/// Softmax of a row, in place: the exponentials of [`exp_scaled`] over the row itself, no
/// buffer of their own.
pub fn softmax_in_place(row: &mut [f32]) {
    let m = max(row);
    let at = row.as_mut_ptr();
    // SAFETY: reads and writes the row's own `row.len()` values, each read before it is written.
    let sum = unsafe { exp_scaled_raw(at, row.len(), m, 1.0, at) };
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|r| *r *= inv);
}

/// The sum of exp((x[i] - shift) * scale) over `n` values at `x`, each written to `out[i]` when
/// `out` is not null (value `i` is read before `out[i]` is written, so `out` may be `x`).
///
/// # Safety
/// `x` is valid for `n` reads and a non-null `out` for `n` writes; `out` either is `x` or
/// overlaps nothing else in use.
unsafe fn exp_scaled_raw(x: *const f32, n: usize, shift: f32, scale: f32, out: *mut f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the pointers as this function's.
        return unsafe { exp_scaled_avx512(x, n, shift, scale, out) };
    }
    let mut sum = 0f32;
    for i in 0..n {
        let e = ((*x.add(i) - shift) * scale).exp();
        if !out.is_null() {
            *out.add(i) = e;
        }
        sum += e;
    }
    sum
}

/// gate <- silu(gate) * up = gate / (1 + exp(-gate)) * up.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let at = gate.as_mut_ptr();
    // SAFETY: `n` values read from `gate` and `up` (both at least that long) and written back to
    // `gate`, each read before it is written; `up`, a shared borrow, cannot overlap `gate`.
    unsafe { swiglu_raw(at, up.as_ptr(), n, at) }
}

/// out[i] = silu(gate[i]) * up[i] for `n` values (gate[i] and up[i] are read before out[i] is
/// written, so `out` may be `gate`).
///
/// # Safety
/// `gate` and `up` are valid for `n` reads and `out` for `n` writes; `out` either is `gate` or
/// overlaps nothing else in use.
pub unsafe fn swiglu_raw(gate: *const f32, up: *const f32, n: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the pointers as this function's.
        return unsafe { swiglu_avx512(gate, up, n, out) };
    }
    for i in 0..n {
        let g = *gate.add(i);
        *out.add(i) = g / (1.0 + (-g).exp()) * *up.add(i);
    }
}

/// # Safety
/// The CPU has AVX-512F; the pointers as [`swiglu_raw`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_avx512(gate: *const f32, up: *const f32, n: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let lanes = (n - i).min(16);
        let mask: u16 = if lanes == 16 { u16::MAX } else { (1u16 << lanes) - 1 };
        let g = _mm512_maskz_loadu_ps(mask, gate.add(i));
        let u = _mm512_maskz_loadu_ps(mask, up.add(i));
        let e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
        _mm512_mask_storeu_ps(out.add(i), mask, y);
        i += 16;
    }
}

/// # Safety
/// The CPU has AVX-512F; the pointers as [`exp_scaled_raw`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_scaled_avx512(x: *const f32, n: usize, shift: f32, scale: f32, out: *mut f32) -> f32 {
    use std::arch::x86_64::*;
    let (s, c) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let lanes = (n - i).min(16);
        let mask: u16 = if lanes == 16 { u16::MAX } else { (1u16 << lanes) - 1 };
        let v = _mm512_maskz_loadu_ps(mask, x.add(i));
        let e = exp_avx512(_mm512_mul_ps(_mm512_sub_ps(v, s), c));
        let e = _mm512_maskz_mov_ps(mask, e);
        if !out.is_null() {
            _mm512_mask_storeu_ps(out.add(i), mask, e);
        }
        acc = _mm512_add_ps(acc, e);
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

/// exp(x) to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r)
/// (Cephes' expf coefficients), then scaled by 2^n. Below the smallest normal result it gives 0
/// (no denormals, which are slow to compute with), above the largest f32 +inf.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let normal = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.33));
    let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.73)), _mm512_set1_ps(-87.33));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for coeff in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coeff));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
    _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(y, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised exponentials agree with libm to a few ulp, and sums, shifts and scales are
    /// applied as documented; rows end inside a vector.
    #[test]
    fn exponentials_match_libm() {
        let row: Vec<f32> = (0..1003).map(|i| ((i as f32) * 0.377).sin() * 30.0 - 10.0).collect();
        let (shift, scale) = (3.5f32, 1.0 / 0.7);
        let mut out = vec![0f32; row.len()];
        let sum = exp_scaled(&row, shift, scale, Some(&mut out));
        let mut want_sum = 0f64;
        for (&l, &got) in row.iter().zip(&out) {
            let want = (((l - shift) * scale) as f64).exp();
            want_sum += want;
            assert!(((got as f64 - want) / want).abs() < 4e-7, "exp({}) = {got}, want {want}", (l - shift) * scale);
        }
        assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-5);
        let lse: f64 = row.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&row) as f64 - lse).abs() < 1e-5);
        let mut under = [0f32; 3];
        exp_scaled(&[-1e9, -88.0, 0.0], 0.0, 1.0, Some(&mut under));
        // Below the smallest normal f32 the AVX-512 path gives 0 and libm a denormal.
        assert!(under[0] == 0.0 && under[1] <= 6.06e-39 && under[2] == 1.0, "underflow: {under:?}");
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn softmax_and_swiglu_by_hand() {
        let mut row = [1.0f32, 2.0, 3.0, -1e9];
        softmax_in_place(&mut row);
        let z = 1f32.exp() + 2f32.exp() + 3f32.exp();
        for (got, want) in row.iter().zip([1f32.exp() / z, 2f32.exp() / z, 3f32.exp() / z, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let up: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 1.0).collect();
        let mut gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let want: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
        swiglu_in_place(&mut gate, &up);
        for (got, want) in gate.iter().zip(&want) {
            assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{got} vs {want}");
        }
    }
}
