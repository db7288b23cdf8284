//! Deterministic reductions (host side of `kernels/reduce.cu`).
//!
//! No atomics: a sum over `len` elements is cut into chunks of `CHUNK`
//! elements that depend only on `len`, never on the GPU or its SM count.
//! Pass 1 reduces each chunk in one block to a partial; pass 2 reduces a
//! segment's partials in one block. Within a block, thread `t` first adds
//! its elements in a fixed order, then the block combines the per-thread
//! values with a fixed pairing tree. So a result is the same on every run
//! and every GPU, and [`emulate_two_pass_sum`] reproduces it bit for bit on
//! the host (the parity tests hold the device to that).
//!
//! Short sums (`len <= SEQ_MAX` elements per output) take one thread per
//! output instead, adding in the reference backend's order: bit-identical
//! to it.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::error::Result;
use crate::tensor::Float;

use super::device::{CudaFloat, Device, block_cfg, check_len, driver_err, elem_cfg, i64_of};
use super::index::SumPlan;
use super::kernels::Kernel;

/// Threads per reduction block (`DMKD_BLOCK`; a power of two).
pub const BLOCK: usize = 256;
/// Elements each thread adds per chunk (`DMKD_ITEMS`).
pub const ITEMS: usize = 8;
/// Elements per chunk, the unit of pass 1.
pub const CHUNK: usize = BLOCK * ITEMS;
/// Sums of at most this many elements per output run sequentially per thread.
pub const SEQ_MAX: usize = 512;

const _: () = assert!(BLOCK.is_power_of_two());

/// Pass-1 blocks of a sum over `len` elements (at least one, so an empty
/// sum still writes its zero).
pub fn chunks(len: usize) -> usize {
    len.div_ceil(CHUNK).max(1)
}

/// The block tree of `block_sum` in the prelude, on the host: `lanes` holds
/// one value per thread; returns lane 0 after the fixed pairing.
fn block_tree<T: Float>(lanes: &mut [T]) -> T {
    debug_assert_eq!(lanes.len(), BLOCK);
    let mut half = BLOCK / 2;
    while half > 0 {
        for t in 0..half {
            lanes[t] += lanes[t + half];
        }
        half /= 2;
    }
    lanes[0]
}

/// Pass 1 for chunk `c` of `len` values: thread `t` adds values
/// `c*CHUNK + k*BLOCK + t`, `k = 0..ITEMS`, in order, from zero.
fn emulate_chunk<T: Float>(c: usize, len: usize, value: &impl Fn(usize) -> T) -> T {
    let mut lanes = vec![T::zero(); BLOCK];
    for (t, lane) in lanes.iter_mut().enumerate() {
        for k in 0..ITEMS {
            let i = c * CHUNK + k * BLOCK + t;
            if i < len {
                *lane += value(i);
            }
        }
    }
    block_tree(&mut lanes)
}

/// Pass 2 over one segment's partials: thread `t` adds partials
/// `t, t + BLOCK, ...` in order, from zero.
fn emulate_partials<T: Float>(partials: &[T]) -> T {
    let mut lanes = vec![T::zero(); BLOCK];
    for (t, lane) in lanes.iter_mut().enumerate() {
        let mut j = t;
        while j < partials.len() {
            *lane += partials[j];
            j += BLOCK;
        }
    }
    block_tree(&mut lanes)
}

/// The device's two-pass sum of `value(0), ..., value(len - 1)`, in exactly
/// the device's order and rounding (every step is one IEEE addition; the
/// kernels are compiled without FMA contraction). The CUDA `sq_err_sum` of
/// `a` and `b` equals `emulate_two_pass_sum(n, |i| (a[i]-b[i])*(a[i]-b[i]))`
/// bit for bit, and likewise the weighted-pair loss and its dot products.
pub fn emulate_two_pass_sum<T: Float>(len: usize, value: impl Fn(usize) -> T) -> T {
    let partials: Vec<T> = (0..chunks(len))
        .map(|c| emulate_chunk(c, len, &value))
        .collect();
    emulate_partials(&partials)
}

/// Pass 2: `out[s] = sum(partial[s*chunks..][..chunks])` for `segments` segments.
pub(crate) fn finish<T: CudaFloat>(
    dev: &Device,
    partial: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    segments: usize,
    chunks: usize,
) -> Result<()> {
    check_len("reduce_partials partials", partial.len(), segments * chunks)?;
    check_len("reduce_partials out", out.len(), segments)?;
    let c64 = i64_of(chunks);
    let f = dev.kernels::<T>()?.get(Kernel::ReducePartials);
    let mut l = dev.stream.launch_builder(f);
    l.arg(partial).arg(out).arg(&c64);
    // SAFETY: reduce_partials(const T* partial, T* out, i64 chunks): three
    // arguments in order; one block of BLOCK threads (the kernel's shared
    // array size) per segment, reading partial[seg*chunks..][..chunks] and
    // writing out[seg], all inside the buffers checked above.
    unsafe { l.launch(block_cfg(segments, BLOCK)?) }.map_err(driver_err("reduce_partials"))?;
    Ok(())
}

/// Sum `x` as `plan` describes: one output per segment.
pub(crate) fn sum_axes<T: CudaFloat>(
    dev: &Device,
    x: &CudaSlice<T>,
    plan: &SumPlan,
) -> Result<CudaSlice<T>> {
    check_len("sum_axes input", x.len(), plan.segments * plan.len)?;
    let mut out = dev.alloc::<T>(plan.segments)?;
    let (seg64, len64) = (i64_of(plan.segments), i64_of(plan.len));
    let module = dev.kernels::<T>()?;
    if plan.len <= SEQ_MAX {
        let mut l = dev.stream.launch_builder(module.get(Kernel::SumAxesSeq));
        l.arg(x)
            .arg(&mut out)
            .arg(&seg64)
            .arg(&len64)
            .arg(&plan.kept)
            .arg(&plan.red);
        // SAFETY: sum_axes_seq(const T* x, T* out, i64 segments, i64 len,
        // Strided kept, Strided red): six arguments in order, descriptors by
        // value; the plan's offsets cover exactly the segments*len elements
        // of x (checked), out holds one element per segment.
        unsafe { l.launch(elem_cfg(plan.segments)) }.map_err(driver_err("sum_axes_seq"))?;
        return Ok(out);
    }
    let chunks = chunks(plan.len);
    let blocks = plan.segments * chunks;
    let mut partial = dev.alloc::<T>(blocks)?;
    let c64 = i64_of(chunks);
    let mut l = dev
        .stream
        .launch_builder(module.get(Kernel::SumAxesPartial));
    l.arg(x)
        .arg(&mut partial)
        .arg(&len64)
        .arg(&c64)
        .arg(&plan.kept)
        .arg(&plan.red);
    // SAFETY: sum_axes_partial(const T* x, T* partial, i64 len, i64 chunks,
    // Strided kept, Strided red): six arguments in order; one block of BLOCK
    // threads per (segment, chunk), each writing partial[blockIdx] (blocks
    // elements allocated) and reading inside x as above.
    unsafe { l.launch(block_cfg(blocks, BLOCK)?) }.map_err(driver_err("sum_axes_partial"))?;
    finish(dev, &partial, &mut out, plan.segments, chunks)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_counted_once() {
        // Integers are exact in f64: a sum of ones counts the visits.
        for len in [
            0,
            1,
            BLOCK - 1,
            BLOCK,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 17,
            BLOCK * CHUNK + 5,
        ] {
            assert_eq!(emulate_two_pass_sum(len, |_| 1.0f64), len as f64, "{len}");
            // Distinct weights: each index exactly once.
            let want = (len as f64) * (len as f64 - 1.0) / 2.0;
            assert_eq!(emulate_two_pass_sum(len, |i| i as f64), want.max(0.0));
        }
    }

    #[test]
    fn the_tree_matches_a_plain_sum_closely() {
        let len = 5 * CHUNK + 123;
        let v = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3;
        let tree = emulate_two_pass_sum(len, v);
        let plain: f64 = (0..len).map(|i| v(i) as f64).sum();
        assert!(
            ((tree as f64) - plain).abs() < 1e-4 * (1.0 + plain.abs()),
            "{tree} {plain}"
        );
    }

    #[test]
    fn chunking_depends_only_on_the_length() {
        assert_eq!(chunks(0), 1);
        assert_eq!(chunks(CHUNK), 1);
        assert_eq!(chunks(CHUNK + 1), 2);
    }
}
