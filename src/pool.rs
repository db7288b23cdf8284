//! A small recycling pool for large tensor buffers.
//!
//! Why: glibc serves allocations above 32 MiB with a fresh `mmap`, so every
//! new P3-sized activation (34 MB in f32) is page-faulted on first touch; an
//! element-wise op writing such a buffer ran about 4x slower than one writing
//! into a reused buffer (`docs/engineering.md`, "Fresh allocations are
//! slow"). A training step allocates the same sizes step after step, so
//! buffers freed by one op are handed to the next op that asks for the same
//! length.
//!
//! Only buffers of at least `MIN_POOLED_BYTES` are kept, matched by exact
//! length, and the pool holds at most `LIMIT_BYTES` in total (oldest evicted
//! first). A huge request the pool cannot serve first frees at least as
//! many held bytes as it will allocate (`HUGE_BYTES`), so held buffers never
//! stack on top of the huge live ones that make the peak of a step.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Buffers smaller than this are not worth pooling.
pub const MIN_POOLED_BYTES: usize = 1 << 20;

/// Bound on the bytes the pool holds (a P3 activation is 34 MB).
pub const LIMIT_BYTES: usize = 256 << 20;

/// A request at least this large that the pool cannot serve first frees
/// held buffers, at least as many bytes as it allocates. Such buffers are a
/// high-resolution level's activations (a two-stage P2 tensor is 131 MiB):
/// the peak of a step is built of them, so held buffers stacked on top of
/// them are what the peak would grow by. Smaller misses (packed weights,
/// scratch, the sizes of the small levels) evict nothing: on retinanet,
/// where every activation is smaller, evicting on every miss made about
/// 1 GiB per step fresh instead of 75 MiB and the loss ~8% slower, for
/// 30 MiB less peak. Measured on two-stage (AMD EPYC Zen 3, f32): peak
/// RSS 1516 MiB without eviction, about 1200 MiB with it (with
/// `tune_allocator`).
pub const HUGE_BYTES: usize = LIMIT_BYTES / 4;

/// Element types with a process-wide pool: f32 and f64. (The pool looks
/// only at lengths and bytes; `tensor::Float` requires this trait, so the
/// pool knows nothing of tensors.)
pub trait PoolElem: Copy + Default + Send + 'static {
    /// What `take` fills its buffers with where debug assertions are on (a
    /// NaN for floats): a kernel that reads an element before writing it
    /// then shows in every test, where a fresh buffer would give it zeros.
    const POISON: Self;
    /// The pool of this element type.
    fn pool() -> &'static Pool<Self>;
}

impl PoolElem for f32 {
    const POISON: Self = f32::NAN;
    fn pool() -> &'static Pool<Self> {
        static POOL: Pool<f32> = Pool::new();
        &POOL
    }
}

impl PoolElem for f64 {
    const POISON: Self = f64::NAN;
    fn pool() -> &'static Pool<Self> {
        static POOL: Pool<f64> = Pool::new();
        &POOL
    }
}

/// Freed buffers by length, oldest first, at most `LIMIT_BYTES` in all.
pub struct Pool<T> {
    free: Mutex<Vec<Vec<T>>>,
    held_bytes: AtomicUsize,
}

impl<T> Pool<T> {
    const fn new() -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            held_bytes: AtomicUsize::new(0),
        }
    }

    /// A held buffer of exactly `len` elements, newest first. On a miss of
    /// a huge buffer (at least `HUGE_BYTES`) the oldest held buffers, at
    /// least as many bytes as the request, are freed first: see
    /// `HUGE_BYTES` for why only then.
    fn take(&self, len: usize) -> Option<Vec<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = free.iter().rposition(|v| v.len() == len) {
            let v = free.swap_remove(pos);
            self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Some(v);
        }
        let evicted = if bytes >= HUGE_BYTES {
            self.evict_oldest(&mut free, bytes)
        } else {
            Vec::new()
        };
        drop(free);
        drop(evicted); // returned to the allocator outside the lock
        None
    }

    /// Remove the oldest held buffers until at least `bytes` are freed (or
    /// none is left) and return them.
    fn evict_oldest(&self, free: &mut Vec<Vec<T>>, bytes: usize) -> Vec<Vec<T>> {
        let mut evicted = Vec::new();
        let mut freed = 0;
        while freed < bytes && !free.is_empty() {
            let old = free.remove(0);
            freed += old.len() * std::mem::size_of::<T>();
            evicted.push(old);
        }
        self.held_bytes.fetch_sub(freed, Ordering::Relaxed);
        evicted
    }

    fn give(&self, v: Vec<T>) {
        let bytes = v.len() * std::mem::size_of::<T>();
        let limit = LIMIT_BYTES;
        if bytes < MIN_POOLED_BYTES || bytes > limit {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let over = (self.held_bytes.load(Ordering::Relaxed) + bytes).saturating_sub(limit);
        let evicted = self.evict_oldest(&mut free, over);
        free.push(v);
        self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        drop(free);
        drop(evicted); // returned to the allocator outside the lock
    }
}

/// How much free memory at the top of a glibc heap stays mapped
/// ([`tune_allocator`]'s `M_TRIM_THRESHOLD`).
///
/// Why: fixing the mmap threshold stops glibc adapting both thresholds,
/// and the trim threshold, which otherwise follows the mmap threshold
/// (twice it), stays at its default of 128 KiB. Every block left to the
/// heaps is then under 1 MiB, yet each free that left more than 128 KiB at
/// a heap's top gave those pages back (`madvise(MADV_DONTNEED)` on the
/// rayon threads' heaps, `brk` on the main one), and the next allocation
/// faulted them in again: about 22k page faults (86 MiB) per retinanet
/// step, 40% of the step's faults. Measured (AMD EPYC Zen 4, AVX-512, 2
/// threads, 2026-12-07, `examples/profile_loss retinanet auto`, minor
/// faults per step by `MALLOC_TRIM_THRESHOLD_`): 56k at 128 KiB, 39k at
/// 512 KiB, 36k at 1 MiB, 33k at 4 MiB, 32.5k from 8 MiB up (what is left
/// are the pool's misses). With 16 MiB set here, `dmkd bench --preset
/// retinanet --only loss --reps 5` against the build before, three
/// alternating rounds: 900 / 851 / 815 -> 810 / 822 / 786 ms; peak RSS
/// 524-525 MiB both ways (two-stage 1190-1194 MiB). The heaps hold only
/// blocks under 1 MiB, so what stays mapped is bounded by this per heap
/// (three with two rayon threads).
pub const TRIM_BYTES: usize = 16 << 20;

/// Make glibc serve every allocation of at least `MIN_POOLED_BYTES` with
/// its own `mmap`, so a freed tensor goes back to the system at once, and
/// keep up to 16 MiB (`TRIM_BYTES`) free at the top of each heap, so that
/// the small blocks freed and allocated again within a step are not
/// faulted in again each time. With glibc's own adaptive mmap threshold,
/// which rises (to 32 MiB) as large blocks are freed, later blocks below
/// it come from arenas whose freed chunks stay resident: on two-stage that
/// kept about 130 MiB above the live peak (peak RSS 1331 against 1191 MiB
/// with the fixed threshold, same speed; AMD EPYC Zen 3, f32). Recurring
/// sizes are recycled by this pool, so the extra `mmap` calls cost nothing
/// measurable.
///
/// A process-wide setting: the `dmkd` CLI calls it first thing; a program
/// embedding the library decides for itself (the Python module leaves the
/// host interpreter's allocator alone). Returns whether it applied (glibc
/// only; elsewhere it does nothing).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a tunable of glibc's allocator; it
        // takes the allocator's own locks and may run at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MIN_POOLED_BYTES as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_BYTES as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A vector of `len` elements whose contents are unspecified (stale values
/// of an earlier tensor, or zeros): the caller must overwrite every element.
///
/// With debug assertions on (the tests' `release-checked` profile) every
/// buffer comes filled with `T::POISON`, fresh or recycled, so a kernel
/// that leans on a small buffer being zeros fails its tests instead of
/// waiting for a recycled one in production.
pub fn take<T: PoolElem>(len: usize) -> Vec<T> {
    let mut v = if len * std::mem::size_of::<T>() >= MIN_POOLED_BYTES
        && let Some(v) = T::pool().take(len)
    {
        v
    } else {
        vec![T::default(); len]
    };
    if cfg!(debug_assertions) {
        v.fill(T::POISON);
    }
    v
}

/// A vector of `len` zeros (`T::default()`), recycled when possible.
pub fn take_zeroed<T: PoolElem>(len: usize) -> Vec<T> {
    let mut v = take(len);
    v.fill(T::default());
    v
}

/// Whether the process-wide pool holds a buffer of exactly `len` elements:
/// how a test sees that something returned its buffer (the allocator may
/// hand a freed block's address out again, so a pointer compared after a
/// `take` cannot tell a recycled buffer from a fresh one).
#[cfg(test)]
pub fn holds<T: PoolElem>(len: usize) -> bool {
    let free = T::pool().free.lock().unwrap_or_else(|e| e.into_inner());
    free.iter().any(|v| v.len() == len)
}

/// Owned tensor storage that returns itself to the pool when dropped.
pub struct Buffer<T: PoolElem> {
    data: Vec<T>,
}

impl<T: PoolElem> Buffer<T> {
    /// Wrap `data`; it goes back to the pool when the buffer is dropped.
    pub fn new(data: Vec<T>) -> Self {
        Buffer { data }
    }
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    /// The elements, taken out of the buffer (they no longer go back to
    /// the pool on their own).
    pub fn into_vec(mut self) -> Vec<T> {
        std::mem::take(&mut self.data)
    }
}

impl<T: PoolElem> Drop for Buffer<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.data);
        if !v.is_empty() {
            T::pool().give(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(p: &Pool<f32>) -> Vec<usize> {
        p.free.lock().unwrap().iter().map(Vec::len).collect()
    }

    #[test]
    fn a_huge_miss_frees_the_oldest_buffers_first_a_small_miss_frees_none() {
        let p = Pool::<f32>::new();
        let mb = MIN_POOLED_BYTES / 4; // one MiB of f32
        let huge = HUGE_BYTES / 4; // in f32
        for len in [mb, 2 * mb, 3 * mb] {
            p.give(vec![0.0; len]);
        }
        assert_eq!(p.held_bytes.load(Ordering::Relaxed), 6 * MIN_POOLED_BYTES);
        // A hit takes the buffer of that length and frees nothing else.
        assert_eq!(p.take(2 * mb).map(|v| v.len()), Some(2 * mb));
        assert_eq!(held(&p), [mb, 3 * mb]);
        p.give(vec![0.0; 2 * mb]);
        // A small miss frees nothing.
        assert!(p.take(5 * mb).is_none());
        assert_eq!(held(&p), [mb, 3 * mb, 2 * mb]);
        // A huge miss frees the oldest until it has freed as many bytes as it
        // asks for (here everything: 6 MiB < the request).
        assert!(p.take(huge).is_none());
        assert!(held(&p).is_empty());
        assert_eq!(p.held_bytes.load(Ordering::Relaxed), 0);
        // ... and no more than that: one huge buffer held, a huge miss of a
        // smaller length frees it and keeps the newer small one.
        p.give(vec![0.0; huge + 1]);
        p.give(vec![0.0; mb]);
        assert!(p.take(huge).is_none());
        assert_eq!(held(&p), [mb]);
        assert_eq!(p.held_bytes.load(Ordering::Relaxed), MIN_POOLED_BYTES);
        // A huge hit is still a hit.
        p.give(vec![0.0; huge]);
        assert_eq!(p.take(huge).map(|v| v.len()), Some(huge));
        assert_eq!(held(&p), [mb]);
    }

    #[test]
    fn each_element_type_has_one_process_wide_pool() {
        // A fresh pool per call would hold every buffer given to it where
        // no `take` can find it: nothing would ever be recycled.
        assert!(std::ptr::eq(f32::pool(), f32::pool()));
        assert!(std::ptr::eq(f64::pool(), f64::pool()));
        assert!(!std::ptr::eq(
            f32::pool() as *const Pool<f32> as *const u8,
            f64::pool() as *const Pool<f64> as *const u8
        ));
    }

    #[test]
    fn the_allocator_tuning_applies_on_glibc() {
        assert_eq!(
            tune_allocator(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }

    #[test]
    fn the_pool_holds_at_most_its_limit_evicting_the_oldest() {
        let p = Pool::<f32>::new();
        let big = LIMIT_BYTES / 4 / 3; // a third of the limit, in f32
        for _ in 0..3 {
            p.give(vec![0.0; big]);
        }
        p.give(vec![0.0; big + 1]);
        assert_eq!(held(&p), [big, big, big + 1]);
        assert!(p.held_bytes.load(Ordering::Relaxed) <= LIMIT_BYTES);
        // Too small or too large to keep: dropped, nothing else changes.
        p.give(vec![0.0; 10]);
        p.give(vec![0.0; LIMIT_BYTES / 4 + 1]);
        assert_eq!(held(&p), [big, big, big + 1]);
        // Exactly the limit is kept, in place of everything else.
        p.give(vec![0.0; LIMIT_BYTES / 4]);
        assert_eq!(held(&p), [LIMIT_BYTES / 4]);
        assert_eq!(p.held_bytes.load(Ordering::Relaxed), LIMIT_BYTES);
    }

    #[test]
    fn large_buffers_are_recycled_small_ones_are_not() {
        // A pool of its own: the process-wide one is shared with every test
        // running in parallel in this binary, whose misses may evict.
        let p = Pool::<f64>::new();
        let len = (MIN_POOLED_BYTES / 8) + 12345;
        let v = vec![1.5f64; len];
        let ptr = v.as_ptr();
        p.give(v);
        let again = p.take(len).expect("the freed buffer should be kept");
        assert_eq!(again.as_ptr(), ptr, "the same buffer handed out again");
        p.give(vec![1.5f64; 10]);
        assert!(p.take(10).is_none(), "small buffers are not kept");
        // The process-wide helpers: fresh or recycled (unless a test
        // running in parallel evicted it), poisoned where debug assertions
        // are on (the tests' profiles), zeroed on request.
        let small = take::<f64>(10);
        drop(Buffer::new(vec![2.5f64; len]));
        let large = take::<f64>(len);
        if cfg!(debug_assertions) {
            assert!(
                small.iter().all(|x| x.is_nan()),
                "fresh buffers are poisoned"
            );
            assert!(large.iter().all(|x| x.is_nan()), "recycled ones too");
        } else {
            assert!(small.iter().all(|&x| x == 0.0));
            assert!(large.iter().all(|&x| x == 0.0 || x == 2.5));
        }
        drop(Buffer::new(vec![2.5f64; len]));
        let z = take_zeroed::<f64>(len);
        assert!(z.iter().all(|&x| x == 0.0));
    }
}
