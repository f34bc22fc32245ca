//! Projection weights packed once for inference, and the matrix product over them.
//!
//! A general matmul library repacks the weight operand on every call: at the 1-16 rows of a decode
//! step that copy costs as much as the product itself. Here `W^T` (in, out) is cut once into
//! panels of [`PANEL`] output columns, each stored `in x PANEL` contiguously, so every product
//! streams the weights in order and keeps its panel's accumulators in registers. Each output sums
//! over the input dimension in the same order whatever the number of rows, so a row's result does
//! not depend on the batch it was computed in.

use super::vexp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Output columns per panel: four AVX-512 registers of f32.
const PANEL: usize = 64;
/// Rows per register block (6 rows x 4 registers = 24 accumulators of the 32 registers).
const ROWS: usize = 6;
/// Input positions per pass of the row blocks over a panel: a 32 KB slice that stays in L1.
const STEPS: usize = 128;
/// Rows per parallel task, so a task's activations stay in cache while its panels stream by.
const ROW_CHUNK: usize = 16 * ROWS;
/// Panel bytes a task may touch, about one core's L2 cache.
const TASK_PANEL_BYTES: usize = 1 << 20;

/// `x W^T + b` with `W` (out, in) packed into column panels.
#[derive(Debug)]
pub struct PackedLinear {
    n_in: usize,
    n_out: usize,
    /// Panel `p` holds `W^T[.., p*PANEL .. (p+1)*PANEL]` as `n_in x PANEL`, zero past `n_out`.
    panels: Vec<f32>,
    /// The bias, zero-padded to whole panels.
    bias: Option<Vec<f32>>,
}

impl PackedLinear {
    /// Packs `weight` (out, in) and `bias` (out), both f32.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Self::stacked(&[(weight, bias)])
    }

    /// Packs projections of one input stacked along their outputs, as one: `x W^T` gives each
    /// part's outputs side by side, every column with the bits its own product would give (a
    /// column's sum does not depend on its neighbours). A part without a bias adds zero.
    pub fn stacked(parts: &[(&Tensor, Option<&Tensor>)]) -> Result<Self> {
        let Some(((first, _), rest)) = parts.split_first() else { candle_core::bail!("packing needs at least one projection") };
        let (_, n_in) = first.dims2()?;
        let weights: Vec<Tensor> = parts.iter().map(|(w, _)| w.contiguous()).collect::<Result<_>>()?;
        if let Some(other) = rest.iter().find(|(w, _)| !matches!(w.dims2(), Ok((_, k)) if k == n_in)) {
            candle_core::bail!("stacked projections take one input width: {:?} and {:?}", first.dims(), other.0.dims());
        }
        // Straight from the tensors' own storage: no flat copy of the weights first.
        let guards: Vec<_> = weights.iter().map(|w| w.storage_and_layout()).collect();
        let mut rows: Vec<&[f32]> = Vec::new();
        for ((storage, layout), w) in guards.iter().zip(&weights) {
            let values = match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => &values[start..end],
                _ => return Err(candle_core::Error::Msg(format!("packing needs f32 weights on the CPU, not {:?}", w.dtype()))),
            };
            rows.extend((0..w.dim(0)?).map(|r| &values[r * n_in..(r + 1) * n_in]));
        }
        let n_out = rows.len();
        let n_panels = n_out.div_ceil(PANEL);
        let mut panels = vec![0f32; n_panels * n_in * PANEL];
        // Panel by panel on every core (a policy's load packs ~135M weights), each transposed a
        // tile of TILE inputs at a time so that the tile's reads and writes stay in L1.
        const TILE: usize = 16;
        panels.par_chunks_mut((n_in * PANEL).max(1)).enumerate().for_each(|(p, panel)| {
            let rows = &rows[p * PANEL..((p + 1) * PANEL).min(n_out)];
            for from in (0..n_in).step_by(TILE) {
                let to = (from + TILE).min(n_in);
                for (c, row) in rows.iter().enumerate() {
                    for (i, &v) in row[from..to].iter().enumerate() {
                        panel[(from + i) * PANEL + c] = v;
                    }
                }
            }
        });
        drop(rows);
        drop(guards);
        let bias = if parts.iter().any(|(_, b)| b.is_some()) {
            let mut padded = Vec::with_capacity(n_panels * PANEL);
            for (w, b) in parts {
                match b {
                    Some(b) => padded.extend(b.to_vec1::<f32>()?),
                    None => padded.resize(padded.len() + w.dim(0)?, 0.0),
                }
            }
            padded.resize(n_panels * PANEL, 0.0);
            Some(padded)
        } else {
            None
        };
        Ok(Self { n_in, n_out, panels, bias })
    }

    /// y (rows, out) for x (rows, in), row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_residual(x, rows, None)
    }

    /// `residual + x W^T + b`, each output's sum added to its residual as it is stored (a
    /// decoder layer's skip connection without a pass over the rows of its own); `residual` has
    /// the output's shape.
    pub fn matmul_residual(&self, x: &[f32], rows: usize, residual: Option<&[f32]>) -> Vec<f32> {
        let len = rows * self.n_out;
        // Not zero-filled first (that cost ~5% of a scoring pass): the product writes every
        // element through raw pointers before reading it back.
        let mut y: Vec<f32> = Vec::with_capacity(len);
        self.product(x, rows, residual, y.spare_capacity_mut().as_mut_ptr().cast::<f32>(), len);
        // SAFETY: `product` initialised all `len` elements: each output block is first stored
        // from the bias or zero (its first pass over the inputs), then accumulated.
        unsafe { y.set_len(len) };
        y
    }

    /// log softmax(x W^T + b)[target] of each row: the head's token log-probs, a chunk of rows at
    /// a time, so the (rows, vocabulary) logits are never held at once.
    pub fn target_logprobs(&self, x: &[f32], targets: &[u32]) -> Result<Vec<f32>> {
        const CHUNK: usize = 4 * ROW_CHUNK;
        if x.len() != targets.len() * self.n_in {
            candle_core::bail!("{} input values for {} targets of width {}", x.len(), targets.len(), self.n_in);
        }
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= self.n_out) {
            candle_core::bail!("target token {bad} is outside the vocabulary ({} rows)", self.n_out);
        }
        let mut logits = vec![0f32; CHUNK.min(targets.len()) * self.n_out];
        let mut out = Vec::with_capacity(targets.len());
        for (xs, ts) in x.chunks(CHUNK * self.n_in).zip(targets.chunks(CHUNK)) {
            let logits = &mut logits[..ts.len() * self.n_out];
            self.matmul_into(xs, ts.len(), logits);
            let chunk: Vec<f32> =
                logits.par_chunks(self.n_out).zip(ts.par_iter()).map(|(row, &t)| row[t as usize] - vexp::log_sum_exp(row)).collect();
            out.extend(chunk);
        }
        Ok(out)
    }

    /// `dz[target] - sum_j softmax(z)_j dz_j` of each row, with `z = x W^T + b` and `dz = dx W^T`:
    /// the tangent of a target's log-probability along the tangent `dx` of the head's input. A
    /// chunk's `x` and `dx` rows go through one product (the panels stream once for both).
    pub fn target_logprob_tangents(&self, x: &[f32], dx: &[f32], targets: &[u32]) -> Result<Vec<f32>> {
        const CHUNK: usize = 2 * ROW_CHUNK;
        let (k, n) = (self.n_in, self.n_out);
        if x.len() != targets.len() * k || dx.len() != x.len() {
            candle_core::bail!("{} input and {} tangent values for {} targets of width {k}", x.len(), dx.len(), targets.len());
        }
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= n) {
            candle_core::bail!("target token {bad} is outside the vocabulary ({n} rows)");
        }
        let most = CHUNK.min(targets.len());
        let (mut inputs, mut logits) = (Vec::with_capacity(2 * most * k), vec![0f32; 2 * most * n]);
        let mut out = Vec::with_capacity(targets.len());
        for ((xs, dxs), ts) in x.chunks(CHUNK * k).zip(dx.chunks(CHUNK * k)).zip(targets.chunks(CHUNK)) {
            inputs.clear();
            inputs.extend_from_slice(xs);
            inputs.extend_from_slice(dxs);
            let logits = &mut logits[..2 * ts.len() * n];
            self.matmul_into(&inputs, 2 * ts.len(), logits);
            let (z, dz) = logits.split_at(ts.len() * n);
            let chunk: Vec<f32> = z
                .par_chunks(n)
                .zip(dz.par_chunks(n))
                .zip(ts.par_iter())
                .map_init(
                    || vec![0f32; n],
                    |p, ((z, dz), &t)| {
                        let sum = vexp::exp_scaled(z, vexp::max(z), 1.0, Some(p));
                        // The product added the bias to `dz` too; the bias's own tangent is zero.
                        let bias = self.bias.as_ref().map_or(0.0, |b| dot(p, &b[..n]));
                        let expected = (dot(p, dz) - bias) / f64::from(sum);
                        let picked = f64::from(dz[t as usize]) - self.bias.as_ref().map_or(0.0, |b| f64::from(b[t as usize]));
                        (picked - expected) as f32
                    },
                )
                .collect();
            out.extend(chunk);
        }
        Ok(out)
    }

    /// [`Self::matmul`] into a caller's buffer of `rows * out` values.
    pub fn matmul_into(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.product(x, rows, None, y.as_mut_ptr(), y.len());
    }

    /// The product, plus `residual` when given, into `y_len` values at `y`, which may be
    /// uninitialised: every one is written (through the pointer, never a reference) before it is
    /// read.
    fn product(&self, x: &[f32], rows: usize, residual: Option<&[f32]>, y: *mut f32, y_len: usize) {
        let (k, n) = (self.n_in, self.n_out);
        // The kernels read and write through raw pointers: the lengths are checked, not assumed.
        assert_eq!(x.len(), rows * k, "packed matmul: input length");
        assert_eq!(y_len, rows * n, "packed matmul: output length");
        assert!(residual.is_none_or(|r| r.len() == y_len), "packed matmul: residual length");
        if rows == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // No inputs: every output is its bias (and residual).
            for i in 0..y_len {
                let v = self.bias.as_ref().map_or(0.0, |b| b[i % n]) + residual.map_or(0.0, |r| r[i]);
                // SAFETY: i < y_len, the buffer's length (checked above).
                unsafe { y.add(i).write(v) };
            }
            return;
        }
        let out = OutPtr(y);
        let kernel = Kernel::detect();
        for_each_task(rows, n.div_ceil(PANEL), k, |row_range, panels| {
            for p in panels {
                let at = row_range.start * n + p * PANEL;
                // SAFETY: tasks write disjoint (row, column) blocks of `y`, which outlives the
                // parallel loop; the panel's columns of the task's rows lie inside it (lengths
                // checked above), as do the residual's.
                unsafe { self.run_panel(kernel, x, row_range.clone(), p, residual.map(|res| &res[at..]), (out.at(at), n)) };
            }
        });
    }

    /// Panel `p` times the rows `rows` of `x`, into `y` (the first row's output of the panel's
    /// first column; rows `y_stride` apart), plus `residual` (laid out as `y`) when given.
    ///
    /// # Safety
    /// `y` (and `residual`) hold `rows.len()` rows `y_stride` apart of the panel's columns, and
    /// no other thread touches them meanwhile.
    unsafe fn run_panel(
        &self,
        kernel: Kernel,
        x: &[f32],
        rows: std::ops::Range<usize>,
        p: usize,
        residual: Option<&[f32]>,
        (y, y_stride): (*mut f32, usize),
    ) {
        let k = self.n_in;
        let panel = &self.panels[p * k * PANEL..(p + 1) * k * PANEL];
        let bias = self.bias.as_ref().map(|b| &b[p * PANEL..(p + 1) * PANEL]);
        let cols = PANEL.min(self.n_out - p * PANEL);
        let blocks = rows.len().div_ceil(ROWS);
        // Every row block takes the same slice of the panel in turn, so the panel streams from
        // memory once, at an even pace, and is reused from L1 by the other blocks; the next slice
        // is prefetched meanwhile, a share per block.
        for steps in (0..k).step_by(STEPS).map(|i| i..(i + STEPS).min(k)) {
            let next = if steps.end < k { &panel[steps.end * PANEL..(steps.end + STEPS).min(k) * PANEL] } else { &[] };
            let share = next.len().div_ceil(blocks);
            for b in 0..blocks {
                let r = rows.start + b * ROWS;
                let prefetch = &next[(b * share).min(next.len())..((b + 1) * share).min(next.len())];
                let block = Block {
                    rows: ROWS.min(rows.end - r),
                    x: &x[r * k..],
                    k,
                    panel,
                    bias,
                    residual: residual.map(|res| &res[b * ROWS * y_stride..]),
                    y: y.add(b * ROWS * y_stride),
                    y_stride,
                    cols,
                };
                // SAFETY: the block's rows and columns lie inside `x`, `panel` and `y`.
                kernel.run(&block, steps.clone(), prefetch);
            }
        }
    }
}

/// Runs `task(rows, panels)` over a grid of row chunks and panel groups on the pool: enough tasks
/// to keep every thread busy when the rows are few (decoding), each touching at most about an L2
/// cache of panels (`k` inputs each).
fn for_each_task(rows: usize, n_panels: usize, k: usize, task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync) {
    let row_chunks = rows.div_ceil(ROW_CHUNK);
    let wanted_groups = (4 * rayon::current_num_threads()).div_ceil(row_chunks.max(1));
    let fit = (TASK_PANEL_BYTES / (k * PANEL * 4).max(1)).max(1);
    let per_group = n_panels.div_ceil(wanted_groups).clamp(1, fit);
    let groups = n_panels.div_ceil(per_group);
    (0..row_chunks * groups).into_par_iter().for_each(|t| {
        let (chunk, group) = (t / groups, t % groups);
        task(chunk * ROW_CHUNK..((chunk + 1) * ROW_CHUNK).min(rows), group * per_group..((group + 1) * per_group).min(n_panels))
    });
}

/// `sum a_i b_i` in f64, over eight lanes (so the sum vectorises).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = a8.remainder().iter().zip(b8.remainder()).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += f64::from(x[i]) * f64::from(y[i]);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The output buffer, shared by tasks that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks that share it write disjoint blocks (`matmul_into`), so no two threads ever
// touch one element, and the buffer outlives the parallel loop that uses it.
unsafe impl Send for OutPtr {}
// SAFETY: as for Send: shared only among tasks writing disjoint blocks.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` must lie inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// One register block: `rows` rows of x times one panel, into `y`.
struct Block<'a> {
    rows: usize,
    /// x from the block's first row on, rows `k` apart.
    x: &'a [f32],
    k: usize,
    panel: &'a [f32],
    bias: Option<&'a [f32]>,
    /// Added to the outputs as the last step stores them: from the block's first output on,
    /// laid out as `y`.
    residual: Option<&'a [f32]>,
    /// The block's first output; rows `y_stride` apart, `cols` (<= PANEL) columns written.
    y: *mut f32,
    y_stride: usize,
    cols: usize,
}

/// The register-block kernel this CPU runs.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }

    /// Adds sum_{i in steps} x[r][i] * panel[i][c] to the block's outputs, which start from the
    /// bias (or zero) when `steps` starts at 0 and take the residual when `steps` ends at `k`;
    /// `prefetch` is brought into cache along the way.
    ///
    /// # Safety
    /// The block's rows, steps and columns must lie inside `x`, `panel` and `y`.
    unsafe fn run(self, block: &Block, steps: std::ops::Range<usize>, prefetch: &[f32]) {
        macro_rules! dispatch {
            ($f:ident $(, $extra:expr)*) => {
                match block.rows {
                    1 => $f::<1>(block, steps $(, $extra)*),
                    2 => $f::<2>(block, steps $(, $extra)*),
                    3 => $f::<3>(block, steps $(, $extra)*),
                    4 => $f::<4>(block, steps $(, $extra)*),
                    5 => $f::<5>(block, steps $(, $extra)*),
                    _ => $f::<ROWS>(block, steps $(, $extra)*),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => dispatch!(block_avx512, prefetch),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => dispatch!(block_avx2),
            Kernel::Portable => dispatch!(block_portable),
        }
    }
}

/// # Safety
/// The CPU has AVX-512F; the block's `rows` rows of `x` (`k` apart) hold every step of `steps`;
/// `panel` holds `steps.end * PANEL` values; `y` (and `residual`, when given) is valid for `rows`
/// rows of `cols` values, `y_stride` apart, and `y` already written when `steps` does not start
/// at 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const R: usize>(block: &Block, steps: std::ops::Range<usize>, prefetch: &[f32]) {
    use std::arch::x86_64::*;
    const LINE: usize = 16; // f32 per cache line
    let masks: [u16; 4] = std::array::from_fn(|j| match block.cols.saturating_sub(16 * j) {
        0 => 0,
        c if c >= 16 => u16::MAX,
        c => ((1u32 << c) - 1) as u16,
    });
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, a) in row.iter_mut().enumerate() {
            *a = if steps.start > 0 {
                _mm512_maskz_loadu_ps(masks[j], block.y.add(r * block.y_stride + 16 * j))
            } else if let Some(b) = block.bias {
                _mm512_loadu_ps(b.as_ptr().add(16 * j))
            } else {
                _mm512_setzero_ps()
            };
        }
    }
    let last = steps.end == block.k;
    let lines_per_step = (prefetch.len() / LINE).div_ceil(steps.len().max(1));
    let mut next_line = 0;
    let (w, x) = (block.panel.as_ptr(), block.x.as_ptr());
    for i in steps {
        for _ in 0..lines_per_step {
            if next_line * LINE < prefetch.len() {
                _mm_prefetch::<_MM_HINT_T0>(prefetch.as_ptr().add(next_line * LINE) as *const i8);
                next_line += 1;
            }
        }
        let wi = w.add(i * PANEL);
        let wv = [0, 1, 2, 3].map(|j| _mm512_loadu_ps(wi.add(16 * j)));
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r * block.k + i));
            for j in 0..4 {
                row[j] = _mm512_fmadd_ps(xv, wv[j], row[j]);
            }
        }
    }
    if let Some(res) = block.residual.filter(|_| last) {
        // The residual plus the finished sum: the one rounding of `residual + y`. (Masked lanes
        // are not read; `wrapping_add` because a fully masked vector may lie past the slice.)
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, a) in row.iter_mut().enumerate() {
                *a = _mm512_add_ps(_mm512_maskz_loadu_ps(masks[j], res.as_ptr().wrapping_add(r * block.y_stride + 16 * j)), *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(block.y.add(r * block.y_stride + 16 * j), masks[j], *v);
        }
    }
}

/// The block for AVX2 CPUs (most AMD EPYC, older Xeons): the plain-Rust body below, compiled for
/// AVX2 with fused multiply-adds, as the AVX-512 kernel rounds.
///
/// # Safety
/// The CPU has AVX2 and FMA; the block is as [`block_avx512`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const R: usize>(block: &Block, steps: std::ops::Range<usize>) {
    block_plain::<R, true>(block, steps)
}

/// The block for other CPUs (vectorised by the compiler; rounding differs from the fused
/// multiply-adds of the kernels above).
///
/// # Safety
/// The block is as [`block_avx512`] requires.
unsafe fn block_portable<const R: usize>(block: &Block, steps: std::ops::Range<usize>) {
    block_plain::<R, false>(block, steps)
}

/// The register block in plain Rust; `FUSED` rounds each multiply-add once (only where the CPU has
/// FMA: elsewhere `mul_add` is a slow library call).
///
/// # Safety
/// The block is as [`block_avx512`] requires.
#[inline(always)]
unsafe fn block_plain<const R: usize, const FUSED: bool>(block: &Block, steps: std::ops::Range<usize>) {
    let (cols, steps_end) = (block.cols, steps.end);
    let mut acc = [[0f32; PANEL]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        if steps.start > 0 {
            std::ptr::copy_nonoverlapping(block.y.add(r * block.y_stride), row.as_mut_ptr(), cols);
        } else if let Some(b) = block.bias {
            row.copy_from_slice(&b[..PANEL]);
        }
    }
    for i in steps {
        let wi = &block.panel[i * PANEL..(i + 1) * PANEL];
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = block.x[r * block.k + i];
            for (a, &w) in row.iter_mut().zip(wi) {
                *a = if FUSED { xv.mul_add(w, *a) } else { *a + xv * w };
            }
        }
    }
    if let Some(res) = block.residual.filter(|_| block.k == steps_end) {
        for (r, row) in acc.iter_mut().enumerate() {
            for (a, &v) in row[..cols].iter_mut().zip(&res[r * block.y_stride..]) {
                *a += v;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), block.y.add(r * block.y_stride), cols);
    }
}

impl CustomOp1 for &PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::contiguous_f32(storage, layout, self.name())?;
        let Some((&n_in, lead)) = layout.dims().split_last() else {
            candle_core::bail!("packed-linear: a scalar input");
        };
        if n_in != self.n_in {
            candle_core::bail!("packed-linear: input width {n_in}, weights expect {}", self.n_in);
        }
        let y = self.matmul(x, lead.iter().product());
        let shape: Vec<usize> = lead.iter().copied().chain([self.n_out]).collect();
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

/// An MLP's gated activation `silu(x G^T) * (x U^T)` with `G` and `U` packed side by side, each
/// padded to whole panels: a task computes a gate panel and the up panel of the same columns for
/// its rows into a scratch block and stores only their product, so the two projections' (rows,
/// 2 x width) outputs are never written out and read back. Each value has the bits of the two
/// products followed by [`vexp::swiglu_in_place`].
#[derive(Debug)]
pub struct PackedSwiGlu {
    /// Gate's panels, then up's: `G` and `U` stacked, each padded with zero rows to whole panels.
    both: PackedLinear,
    width: usize,
}

impl PackedSwiGlu {
    /// Packs `gate` and `up` (width, in), f32, without biases.
    pub fn new(gate: &Tensor, up: &Tensor) -> Result<Self> {
        let (width, n_in) = gate.dims2()?;
        if up.dims() != [width, n_in] {
            candle_core::bail!("gated projections of one shape expected: gate {:?}, up {:?}", gate.dims(), up.dims());
        }
        let pad = width.next_multiple_of(PANEL) - width;
        let padded = |w: &Tensor| -> Result<Tensor> {
            if pad == 0 {
                return Ok(w.clone());
            }
            Tensor::cat(&[w, &Tensor::zeros((pad, n_in), w.dtype(), w.device())?], 0)
        };
        Ok(Self { both: PackedLinear::stacked(&[(&padded(gate)?, None), (&padded(up)?, None)])?, width })
    }

    /// The activations (rows, width) for x (rows, in), row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (k, n) = (self.both.n_in, self.width);
        assert_eq!(x.len(), rows * k, "packed swiglu: input length");
        let len = rows * n;
        // Not zero-filled first: every value is written below before the vector is read.
        let mut y: Vec<f32> = Vec::with_capacity(len);
        if len == 0 {
            return y;
        }
        let half_panels = n.div_ceil(PANEL);
        let (out, kernel) = (OutPtr(y.spare_capacity_mut().as_mut_ptr().cast::<f32>()), Kernel::detect());
        for_each_task(rows, half_panels, k, |row_range, panels| {
            // Each row of the scratch: the gate panel's outputs, then the up panel's.
            let mut scratch = vec![0f32; row_range.len() * 2 * PANEL];
            for p in panels {
                let cols = PANEL.min(n - p * PANEL);
                for (part, panel) in [(0, p), (PANEL, half_panels + p)] {
                    // SAFETY: the scratch holds the task's rows, 2 * PANEL apart, of which the
                    // panel's PANEL columns start at `part`; only this task uses it.
                    unsafe { self.both.run_panel(kernel, x, row_range.clone(), panel, None, (scratch.as_mut_ptr().add(part), 2 * PANEL)) };
                }
                for (i, row) in scratch.chunks(2 * PANEL).enumerate() {
                    let (gate, up) = row.split_at(PANEL);
                    // SAFETY: `cols` values of the scratch row's gate and up halves are read; the
                    // writes go to row `row_range.start + i`, columns `p * PANEL ..+ cols` of `y`,
                    // inside it, a block no other task writes; `y` outlives the loop.
                    unsafe { vexp::swiglu_raw(gate.as_ptr(), up.as_ptr(), cols, out.at((row_range.start + i) * n + p * PANEL)) };
                }
            }
        });
        // SAFETY: the tasks cover every (row, panel) pair, and each wrote its rows' `cols` values
        // of the panel's columns: all `len` values.
        unsafe { y.set_len(len) };
        y
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for PackedSwiGlu {
    fn name(&self) -> &'static str {
        "packed-swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::contiguous_f32(storage, layout, self.name())?;
        let Some((&n_in, lead)) = layout.dims().split_last() else { candle_core::bail!("packed-swiglu: a scalar input") };
        if n_in != self.both.n_in {
            candle_core::bail!("packed-swiglu: input width {n_in}, weights expect {}", self.both.n_in);
        }
        let y = self.matmul(x, lead.iter().product());
        let shape: Vec<usize> = lead.iter().copied().chain([self.width]).collect();
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

/// `residual + x W^T + b` ([`PackedLinear::matmul_residual`]); the first operand is `x`.
struct WithResidual<'a>(&'a PackedLinear);

impl CustomOp2 for WithResidual<'_> {
    fn name(&self) -> &'static str {
        "packed-linear-residual"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout, res: &CpuStorage, res_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let packed = self.0;
        let x = super::fused::contiguous_f32(x, x_layout, self.name())?;
        let residual = super::fused::contiguous_f32(res, res_layout, self.name())?;
        let Some((&n_in, lead)) = x_layout.dims().split_last() else {
            candle_core::bail!("{}: a scalar input", self.name());
        };
        let shape: Vec<usize> = lead.iter().copied().chain([packed.n_out]).collect();
        if n_in != packed.n_in || res_layout.dims() != shape.as_slice() {
            candle_core::bail!(
                "{}: input {:?} and residual {:?} for weights ({}, {})",
                self.name(),
                x_layout.dims(),
                res_layout.dims(),
                packed.n_out,
                packed.n_in
            );
        }
        let y = packed.matmul_residual(x, lead.iter().product(), Some(residual));
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

impl PackedLinear {
    /// `x W^T + b` over the last dimension of an f32 CPU tensor (no gradient).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&self)
    }

    /// `residual + x W^T + b`, the sum stored as the product finishes (no gradient).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, &WithResidual(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    fn tensor(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 + seed) * 0.7316).sin()).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The packed product equals x W^T + b for row counts across the register blocks and the
    /// parallel chunks, and output widths that end inside a panel.
    #[test]
    fn packed_product_matches_matmul() {
        for (rows, n_in, n_out) in [(1, 8, 3), (5, 40, 64), (7, 33, 130), (16, 64, 192), (203, 48, 70), (3, 300, 20), (2, 0, 5)] {
            let (x, w, b) = (tensor(rows, n_in, 0.0), tensor(n_out, n_in, 1.0), tensor(1, n_out, 2.0).squeeze(0).unwrap());
            let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            for bias in [None, Some(&b)] {
                let packed = PackedLinear::new(&w, bias).unwrap();
                let got = packed.forward(&x).unwrap();
                let want = if bias.is_some() { want.clone() } else { x.matmul(&w.t().unwrap()).unwrap() };
                let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-4, "rows {rows} in {n_in} out {n_out}: {err}");
            }
        }
    }

    /// Projections stacked into one product give each part's columns with the bits of its own
    /// product (parts that straddle panels, a bias on one part only).
    #[test]
    fn stacked_projections_give_each_parts_bits() {
        let x = tensor(9, 40, 0.0);
        let (a, b, c) = (tensor(70, 40, 1.0), tensor(24, 40, 2.0), tensor(24, 40, 3.0));
        let bias = tensor(1, 24, 4.0).squeeze(0).unwrap();
        let parts = [(&a, None), (&b, Some(&bias)), (&c, None)];
        let alone: Vec<Tensor> = parts.iter().map(|&(w, b)| PackedLinear::new(w, b).unwrap().forward(&x).unwrap()).collect();
        let stacked = PackedLinear::stacked(&parts).unwrap().forward(&x).unwrap();
        assert_eq!(bits(&stacked), bits(&Tensor::cat(&alone, 1).unwrap()));
        assert!(PackedLinear::stacked(&[(&a, None), (&tensor(3, 8, 0.0), None)]).is_err(), "two input widths");
    }

    /// The gated product gives the bits of the fused swiglu over the two products: widths ending
    /// inside a panel and on one, several row chunks, several passes over the inputs, no inputs.
    #[test]
    fn gated_product_is_swiglu_of_the_two_products() {
        for (rows, n_in, width) in [(9, 40, 50), (ROW_CHUNK + 5, 300, 128), (1, 8, 64), (3, 0, 20)] {
            let x = tensor(rows, n_in, 0.0);
            let (gate, up) = (tensor(width, n_in, 5.0), tensor(width, n_in, 6.0));
            let product = |w: &Tensor| PackedLinear::new(w, None).unwrap().forward(&x).unwrap();
            let want = super::super::fused::swiglu(&product(&gate), &product(&up)).unwrap();
            let got = PackedSwiGlu::new(&gate, &up).unwrap().forward(&x).unwrap();
            assert_eq!(got.dims(), [rows, width]);
            assert_eq!(bits(&got), bits(&want), "{rows} x {n_in} -> {width}");
        }
        assert!(PackedSwiGlu::new(&tensor(4, 8, 0.0), &tensor(5, 8, 0.0)).is_err(), "two widths");
    }

    /// The residual added as the outputs are stored gives the bits of `residual + x W^T + b`
    /// computed apart: across register blocks, parallel chunks, several passes over the inputs
    /// (k > STEPS), an output width ending inside a panel, and no inputs at all.
    #[test]
    fn residual_in_the_product_is_the_sum_taken_apart() {
        for (rows, n_in, n_out) in [(1, 8, 3), (7, 300, 130), (ROW_CHUNK + 5, 40, 64), (3, 0, 20)] {
            let (x, w, b) = (tensor(rows, n_in, 0.0), tensor(n_out, n_in, 1.0), tensor(1, n_out, 2.0).squeeze(0).unwrap());
            let residual = tensor(rows, n_out, 4.0);
            for bias in [None, Some(&b)] {
                let packed = PackedLinear::new(&w, bias).unwrap();
                let want = (&residual + packed.forward(&x).unwrap()).unwrap();
                let got = packed.forward_residual(&x, &residual).unwrap();
                assert_eq!(bits(&got), bits(&want), "rows {rows} in {n_in} out {n_out}");
            }
        }
        let packed = PackedLinear::new(&tensor(4, 8, 1.0), None).unwrap();
        assert!(packed.forward_residual(&tensor(2, 8, 0.0), &tensor(2, 3, 0.0)).is_err(), "a residual of the wrong shape");
    }

    /// A row's output is bit-identical whether it is computed alone or inside a batch, and every
    /// kernel this CPU can run agrees with the detected one.
    #[test]
    fn row_results_do_not_depend_on_the_batch_or_kernel() {
        let (x, w) = (tensor(13, 96, 0.5), tensor(100, 96, 3.0));
        let packed = PackedLinear::new(&w, None).unwrap();
        let all: Vec<f32> = packed.matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), 13);
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for r in [0, 6, 12] {
            assert_eq!(packed.matmul(&xs[r * 96..(r + 1) * 96], 1), all[r * 100..(r + 1) * 100].to_vec());
        }
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            kernels.push(Kernel::Avx2);
        }
        let residual: Vec<f32> = (0..100).map(|i| i as f32 * 0.25).collect();
        for (kernel, with_residual) in kernels.into_iter().flat_map(|k| [(k, false), (k, true)]) {
            let mut y = vec![0f32; 100];
            for p in 0..2 {
                let panel = &packed.panels[p * 96 * PANEL..(p + 1) * 96 * PANEL];
                // SAFETY: p * 64 < 100 = y.len().
                let out = unsafe { y.as_mut_ptr().add(p * 64) };
                let residual = with_residual.then(|| &residual[p * 64..]);
                let block =
                    Block { rows: 1, x: &xs[..96], k: 96, panel, bias: None, residual, y: out, y_stride: 100, cols: 64.min(100 - p * 64) };
                // Two passes over the inputs, as the parallel product makes them.
                // SAFETY: one row of 96 inputs, the panel's 96 steps, `cols` outputs inside `y`.
                unsafe { kernel.run(&block, 0..50, &[]) };
                unsafe { kernel.run(&block, 50..96, &[]) };
            }
            let added = |i: usize| if with_residual { residual[i] } else { 0.0 };
            let diff = y.iter().enumerate().map(|(i, a)| (a - all[i] - added(i)).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "a kernel differs from the detected one (residual {with_residual}): {diff}");
        }
    }

    /// The tangents of the target log-probs equal `dz[t] - sum softmax(z) dz` computed with tensors,
    /// with and without a bias (whose tangent is zero), across the chunks of rows.
    #[test]
    fn target_logprob_tangents_match_the_tensor_formula() {
        let (rows, n_in, n_out) = (2 * ROW_CHUNK + 5, 24, 150);
        let (x, dx, w) = (tensor(rows, n_in, 0.0), tensor(rows, n_in, 5.0), tensor(n_out, n_in, 1.0));
        let b = tensor(1, n_out, 2.0).squeeze(0).unwrap();
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 37) % n_out) as u32).collect();
        let t = Tensor::from_vec(targets.clone(), (rows, 1), &Device::Cpu).unwrap();
        for bias in [None, Some(&b)] {
            let z = x.matmul(&w.t().unwrap()).unwrap();
            let z = if let Some(b) = bias { z.broadcast_add(b).unwrap() } else { z };
            let dz = dx.matmul(&w.t().unwrap()).unwrap();
            let p = candle_nn::ops::softmax(&z, 1).unwrap();
            let want = (dz.gather(&t, 1).unwrap().squeeze(1).unwrap() - (p * &dz).unwrap().sum(1).unwrap()).unwrap();
            let want: Vec<f32> = want.to_vec1().unwrap();
            let packed = PackedLinear::new(&w, bias).unwrap();
            let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let got = packed.target_logprob_tangents(&flat(&x), &flat(&dx), &targets).unwrap();
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "bias {}: {err}", bias.is_some());
        }
        assert!(PackedLinear::new(&w, None).unwrap().target_logprob_tangents(&flat_zero(n_in), &flat_zero(n_in), &[n_out as u32]).is_err());
    }

    fn flat_zero(n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
}
