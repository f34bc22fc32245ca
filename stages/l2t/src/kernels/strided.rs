//! Products of strided f32 matrices on `gemm` (the kernels candle's CPU matmul calls), for the
//! passes that own their buffers: the training pass ([`crate::train::decoder_pass`]) and the
//! attention of gradient-free passes ([`super::attention`]).

use candle_core::{bail, Result};
use gemm::Parallelism;

/// A strided matrix: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major (rows, cols) matrix at the start of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// (rows, cols) with rows `rs` apart (a head's columns inside a wider row).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self { data, rows, cols, rs, cs: 1 }
    }

    pub fn n_rows(&self) -> usize {
        self.rows
    }

    /// Its first `n` rows (all of them when it has fewer).
    pub fn first_rows(self, n: usize) -> Self {
        Self { rows: self.rows.min(n), ..self }
    }

    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (m, n) = a (m, k) b (k, n)`, or `dst += a b` when `accumulate`; `dst` row-major with
/// rows `dst_rs` apart. `par`: split over the thread pool (not inside a parallel task).
pub fn matmul(dst: &mut [f32], dst_rs: usize, a: View, b: View, accumulate: bool, par: bool) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        bail!("matmul: ({m}, {k}) x ({}, {n})", b.rows);
    }
    if !(a.in_bounds() && b.in_bounds()) {
        bail!("matmul: an operand reaches past its buffer");
    }
    if !(dst_rs >= n && (m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len())) {
        bail!("matmul: the destination is too small");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return Ok(());
    }
    let parallelism = if par { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
    // SAFETY: gemm reads a[i * rs + j * cs] for i < m, j < k (and b likewise for k, n), all inside
    // their slices (`in_bounds`), and writes dst[i * dst_rs + j] for i < m, j < n, inside `dst`
    // (checked above); `dst` is a unique borrow, so it overlaps neither operand, and its rows do
    // not overlap each other (dst_rs >= n).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
