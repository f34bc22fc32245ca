//! The CPU backend's kernels: the fused elementwise kernels with their backward passes
//! ([`fused`]), the packed projections and the attention for inference ([`packed`],
//! [`attention`]), strided products on `gemm` ([`strided`]) and the vectorised exponentials
//! ([`vexp`]). Every caller picks between them and candle's composed ops with one
//! predicate, [`cpu_f32`]; the composed ops are the device-generic path (the one CUDA runs), so
//! a GPU backend joins here: its own predicate and kernels, the callers unchanged.

pub mod attention;
pub mod fused;
pub mod packed;
pub(crate) mod strided;
pub mod vexp;

use crate::config::DeviceSpec;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The devices this build can run on here: the CPU, and the first CUDA GPU when the build has
/// CUDA and the machine has one. Numerics tests loop over them.
pub fn available_devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    if candle_core::utils::cuda_is_available() {
        devices.extend(Device::new_cuda(0).ok());
    }
    devices
}

/// The candle device the `device` knob names. A CPU build asked for a GPU fails with one line
/// that says how to get a CUDA build; a CUDA build without that GPU says so.
pub fn open_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) if !candle_core::utils::cuda_is_available() => {
            bail!("device = \"cuda:{n}\": this build has no CUDA support (build the stages with the cargo feature `cuda`)")
        }
        DeviceSpec::Cuda(n) => Device::new_cuda(n).with_context(|| format!("device = \"cuda:{n}\": no such CUDA GPU")),
    }
}

/// Runs `work` on a thread of the CPU kernels' pool (rayon's global pool) and waits for it. A
/// parallel region started from outside the pool is injected into it: the caller sleeps on a
/// latch while a worker is woken, two futex round trips for every product, and a decode step
/// starts ~120 products. From a worker, a region's jobs go on that worker's own queue and it
/// works on them itself. With one thread the caller keeps the work: the lone worker, blocked on a
/// thread of the caller's (the tokenizer's parse, D~'s eigenproblems) that waits on the pool in
/// turn, would never be relieved. [`generic`]'s switch goes along.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() < 2 {
        return work();
    }
    let generic_ops = GENERIC.with(|g| g.get());
    rayon::scope(|_| if generic_ops { generic(work) } else { work() })
}

/// Runs `work` (on a thread of the pool) with the pool's other threads kept awake: each spins,
/// taking whatever jobs appear, until `work` returns. Between a decode step's ~120 short
/// products the serial ops outlast rayon's spin, so an idle worker goes to sleep and every
/// product paid a futex wake-up to get it back; OpenMP runtimes spin the same way. Only for
/// loops of short parallel regions: a spinning thread holds its core.
pub fn with_pool_awake<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(owner) = rayon::current_thread_index() else { return work() };
    if rayon::current_num_threads() < 2 {
        return work();
    }
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    // Set when `work` returns or unwinds.
    let done = Done(Arc::new(AtomicBool::new(false)));
    let flag = Arc::clone(&done.0);
    rayon::spawn_broadcast(move |ctx| {
        // The owner never spins: it would bury `work`, which sets the flag, under the loop.
        if ctx.index() != owner {
            spin_until(&flag);
        }
    });
    work()
}

/// How long a spinning worker goes without finding a job before it gives up and lets rayon put
/// it to sleep (for the rest of its `work`): far above the serial gaps of a decode step (a
/// SmolLM2 step at batch 1 is ~18 ms whole), short enough that a spinner that should not be
/// spinning (below) costs one stall.
const SPIN_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(50);

thread_local! {
    /// Set while this thread runs [`spin_until`].
    static SPINNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A spinner's loop: take the pool's jobs until `done` is set, or until no job came for
/// [`SPIN_IDLE_LIMIT`]. A spinner can be started by a thread waiting inside a job (rayon runs
/// whatever is queued while it waits on a join), for instance a job of `work` itself that it took
/// while spinning for an earlier `work`; spinning there until its own `work` returns would never
/// end, since `work` waits for the job buried under the loop. So a spinner started on a thread
/// that is already spinning returns at once, and any other spinner gives up when the pool has
/// had nothing for it for a while.
fn spin_until(done: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    if SPINNING.with(|s| s.replace(true)) {
        return;
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            SPINNING.with(|s| s.set(false));
        }
    }
    let _reset = Reset;
    let mut last_job = std::time::Instant::now();
    let mut idle_spins = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_spins = 0;
            last_job = std::time::Instant::now();
            continue;
        }
        std::hint::spin_loop();
        idle_spins += 1;
        // The clock read only every 64 idle spins.
        if idle_spins.is_multiple_of(64) && last_job.elapsed() > SPIN_IDLE_LIMIT {
            return;
        }
    }
}

/// Whether a tensor takes the CPU backend's kernels: f32 on the CPU. Anything else (another
/// dtype, another device) takes candle's composed ops.
pub fn cpu_f32(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu() && !GENERIC.with(|g| g.get())
}

thread_local! {
    /// Set while [`generic`] runs: this thread takes the composed ops even for f32 CPU tensors.
    static GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the CPU backend's kernels off on this thread, so that the CPU runs the
/// device-generic composed ops a GPU runs: how the tests check that path against the kernels
/// without a GPU. The switch is per thread (the choice is made where a model's forward pass
/// runs, never inside a kernel's worker threads), so tests running beside it are not affected.
pub fn generic<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC.with(|g| g.replace(true)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::AtomicBool;

    /// A spinner whose `work` never ends gives up once the pool has had nothing for it; one
    /// started on a thread that is already spinning returns at once and leaves the outer one
    /// spinning.
    #[test]
    fn a_spinner_gives_up_when_idle_and_never_nests() {
        let never = AtomicBool::new(false);
        let started = std::time::Instant::now();
        spin_until(&never);
        assert!(started.elapsed() >= SPIN_IDLE_LIMIT);
        assert!(!SPINNING.with(|s| s.get()));
        SPINNING.with(|s| s.set(true));
        spin_until(&never);
        assert!(SPINNING.with(|s| s.get()), "the nested spinner reset its outer one's mark");
        SPINNING.with(|s| s.set(false));
        spin_until(&AtomicBool::new(true));
    }

    /// Batch after batch of nested parallel work under [`with_pool_awake`], as the sampler runs
    /// its batches: a worker still spinning for one batch takes jobs of the next, and a spinner
    /// for the next can start while it waits inside one of them. It all ends.
    #[test]
    fn batches_of_nested_parallel_work_under_a_kept_awake_pool_end() {
        let total: f64 = on_pool(|| {
            (0..3000)
                .map(|batch| {
                    with_pool_awake(|| {
                        (0..8)
                            .into_par_iter()
                            .map(|i| (0..16).into_par_iter().map(|j| f64::from(batch * i * j % 7)).sum::<f64>())
                            .sum::<f64>()
                    })
                })
                .sum()
        });
        let want: f64 = (0..3000).map(|b| (0..8).flat_map(|i| (0..16).map(move |j| f64::from(b * i * j % 7))).sum::<f64>()).sum();
        assert_eq!(total, want);
    }
}
