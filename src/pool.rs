//! A small recycling pool for large tensor buffers.
//!
//! Why: glibc serves allocations above 32 MiB with a fresh `mmap`, so every
//! new P3-sized activation (34 MB in f32) is page-faulted on first touch; an
//! element-wise op writing such a buffer ran about 4x slower than one writing
//! into a reused buffer (`docs/engineering.md`, "Fresh allocations are
//! slow"). A training step allocates the same sizes step after step, so
//! buffers freed by one op are handed to the next op that asks for the same
//! length (or up to an eighth less).
//!
//! Only buffers of at least `MIN_POOLED_BYTES` are kept, at most
//! `LIMIT_BYTES` in total (oldest evicted first). A request takes the
//! smallest held buffer that fits it with at most an eighth to spare
//! (`SLACK_DIV`). A request the pool cannot serve is a fresh allocation
//! that grows the process's footprint, so it first frees held buffers:
//! every huge one (`HUGE_BYTES`), then the oldest, as many bytes as it
//! allocates, as long as more than `KEEP_BYTES` stay held (all the way
//! down for a huge request). Held buffers then never stack on top of the
//! huge live ones that make the peak of a high-resolution step. The one
//! exception is a forward pass that is taking back the huge buffers of the
//! last backward pass: there a small miss spares them
//! (`keeps_huge_buffers`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Buffers smaller than this are not worth pooling.
pub const MIN_POOLED_BYTES: usize = 1 << 20;

/// Bound on the bytes the pool holds (a P3 activation is 34 MB).
///
/// Why 640 MiB: a two-stage step ends holding what its backward pass
/// freed, four or more P2 buffers (131 MiB) among them, and its next
/// forward pass asks for them again ([`keeps_huge_buffers`]). At the
/// step's end nothing else is live but the inputs, so this is below the
/// step's peak. Against 512 MiB (AMD EPYC Zen 3, AVX2, 2 threads,
/// 2026-12-08, `dmkd bench --only loss`, two alternated pairs): page
/// faults of the run two-stage direct 2.04M -> 1.68-1.69M, `auto` 1.97M
/// -> 1.96M; peak RSS two-stage direct 1213.7-1214.1 -> 1214.4-1214.8
/// MiB, `auto` 1198.9 -> 1198.7-1198.8, retinanet `auto` 506.9 -> 505.4,
/// direct 484.5 both.
pub const LIMIT_BYTES: usize = 640 << 20;

/// A held buffer serves a request for as few as `cap - cap / 9` of its
/// `cap` elements (the request plus an eighth at most).
///
/// Why: with exact lengths the pool held dozens of buffers that no
/// request matched while requests a few percent smaller missed: the
/// aligned scratch buffers are 64 bytes longer than the tensors of their
/// size, weight-sized gradients (2359296 bytes at 256 x 256 x 3 x 3)
/// piled up next to misses of 2150400 and 1948480, P4 requests of 8601600
/// missed next to held 9437248. A temporary log of one retinanet step
/// (AMD EPYC Zen 4, family 25 model 17, 2026-12-07): 21 misses, 125 MiB,
/// with 160-225 MiB held. Best fit within an eighth, `dmkd bench --preset
/// retinanet --only loss --reps 5` against exact lengths, three alternating
/// rounds: 805 / 862 / 824 -> 789 / 783 / 794 ms, page faults of the run
/// 288k -> 214k, peak RSS 525 -> 492 MiB.
pub const SLACK_DIV: usize = 8;

/// A request at least this large (a two-stage P2 tensor is 131 MiB; the
/// largest at retinanet, P3, is 33 MiB) is huge: such buffers make the
/// peak of a step, so a miss frees every held huge buffer (but for a
/// forward pass's small misses, [`keeps_huge_buffers`]), and a huge miss
/// frees at least as many held bytes as it allocates, whatever is left.
pub const HUGE_BYTES: usize = 64 << 20;

/// A miss frees held buffers, as many bytes as it allocates, only while
/// the pool holds more than this.
///
/// Why: each fresh buffer grows the footprint, and the pool's buffers
/// held at the peak are what the peak grows by; but evicting on every
/// miss down to nothing made about 1 GiB per retinanet step fresh instead
/// of 75 MiB and the loss ~8% slower (AMD EPYC Zen 3), since the buffers
/// evicted are asked for again later in the step. Measured (Zen 4 as
/// above, `dmkd bench --only loss`: peak RSS, and the page faults of the
/// whole run, `--reps` 5 or 3 for retinanet, 3 for two-stage `auto`, 2
/// for two-stage direct):
///
/// | rule | retinanet `auto` | two-stage `auto` | two-stage direct |
/// |---|---|---|---|
/// | exact lengths, 256 MiB, small misses free nothing (before) | 525 MiB, 288k | 1192 MiB, 2.36M | 1215 MiB, 2.22M |
/// | best fit, 256 MiB, small misses free nothing | 492 MiB, 214k | 1209 MiB, 2.28M | 1217 MiB, 2.06M |
/// | best fit, 512 MiB, keep 128 MiB | 483 MiB, 199k | 1185 MiB, 2.07M | 1215 MiB, 1.95M |
/// | best fit, 512 MiB, keep 192 MiB | 494 MiB, 125k | 1206 MiB, 1.76M | 1253 MiB |
/// | the same, and a miss frees held huge buffers first (this, with the two changes below) | 494 MiB, 125k | 1184 MiB, 2.07M | 1216 MiB, 2.09M |
///
/// At 125k a retinanet run makes no page fault inside its steps. Without
/// freeing held huge buffers, two-stage direct held a 131 MiB P2 buffer
/// at its peak. Since then (AMD EPYC Zen 3, 2026-12-08): a forward pass's
/// small misses spare them ([`keeps_huge_buffers`]) and the pool holds up
/// to 640 MiB ([`LIMIT_BYTES`]).
pub const KEEP_BYTES: usize = 192 << 20;

/// Whether a small miss leaves the held huge buffers alone: outside a
/// backward pass, while the last huge request was served from one.
///
/// Why: a step starts with the P2 buffers its backward pass freed, and
/// its forward pass asks for them again, one per P2 conv, with small
/// requests between; freeing them at the first small miss made two of the
/// three fresh. The forward pass only adds to what it keeps, so the
/// step's peak comes later, in the backward pass, where a held huge buffer
/// could sit on top of the live ones through a whole conv: there every
/// miss frees them as before. Measured (AMD EPYC Zen 3, AVX2, 2 threads,
/// 2026-12-08, `examples/profile_loss two-stage`, and `dmkd bench --only
/// loss` for the peak): see `docs/engineering.md`, "Where a two-stage
/// step's page faults are".
fn keeps_huge_buffers(in_backward: bool, last_huge_hit: bool) -> bool {
    !in_backward && last_huge_hit
}

/// Backward passes running now, on any tape and thread.
static BACKWARD_PASSES: AtomicUsize = AtomicUsize::new(0);

/// Whether a backward pass is running ([`BackwardPass`]).
pub(crate) fn in_backward() -> bool {
    BACKWARD_PASSES.load(Ordering::Relaxed) > 0
}

/// Tells the pool a backward pass is running while it lives
/// ([`keeps_huge_buffers`]); `Var::backward` holds one.
pub(crate) struct BackwardPass(());

impl BackwardPass {
    pub(crate) fn begin() -> Self {
        BACKWARD_PASSES.fetch_add(1, Ordering::Relaxed);
        BackwardPass(())
    }
}

impl Drop for BackwardPass {
    fn drop(&mut self) {
        BACKWARD_PASSES.fetch_sub(1, Ordering::Relaxed);
    }
}

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

/// Freed buffers, at most `LIMIT_BYTES` in all, in the order given (a hit
/// moves the newest into its place, so "oldest" is nearly so).
pub struct Pool<T> {
    free: Mutex<Vec<Vec<T>>>,
    held_bytes: AtomicUsize,
    /// Whether the last huge request was served from a held buffer.
    last_huge_hit: AtomicBool,
}

impl<T: Copy + Default> Pool<T> {
    const fn new() -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            held_bytes: AtomicUsize::new(0),
            last_huge_hit: AtomicBool::new(false),
        }
    }

    /// The bytes a buffer holds: its capacity, which may exceed its length
    /// (a buffer handed out for a shorter request keeps its allocation).
    fn bytes_of(v: &Vec<T>) -> usize {
        v.capacity() * std::mem::size_of::<T>()
    }

    /// A held buffer for `len` elements: the smallest that holds them
    /// with at most an eighth to spare ([`SLACK_DIV`]), newest of equals,
    /// its length set to `len`. On a miss, held buffers are freed first
    /// (see [`KEEP_BYTES`], [`HUGE_BYTES`] and [`keeps_huge_buffers`]).
    /// `in_backward`: whether a backward pass is running ([`BackwardPass`]).
    fn take(&self, len: usize, in_backward: bool) -> Option<Vec<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let most = len + len / SLACK_DIV;
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(usize, usize)> = None;
        for (pos, v) in free.iter().enumerate() {
            let cap = v.capacity();
            if (len..=most).contains(&cap) && best.is_none_or(|(_, b)| cap <= b) {
                best = Some((pos, cap));
            }
        }
        if bytes >= HUGE_BYTES {
            self.last_huge_hit.store(best.is_some(), Ordering::Relaxed);
        }
        if let Some((pos, _)) = best {
            let mut v = free.swap_remove(pos);
            self.held_bytes
                .fetch_sub(Self::bytes_of(&v), Ordering::Relaxed);
            drop(free);
            // Within the capacity: no allocation. The values are stale
            // either way; the caller overwrites every element.
            v.resize(len, T::default());
            return Some(v);
        }
        // A huge miss has just set `last_huge_hit` false: only a small
        // miss can spare the held huge buffers.
        let keep_huge = keeps_huge_buffers(in_backward, self.last_huge_hit.load(Ordering::Relaxed));
        let (mut evicted, freed) = if keep_huge {
            (Vec::new(), 0)
        } else {
            self.evict_huge(&mut free)
        };
        let want = if bytes >= HUGE_BYTES {
            bytes.saturating_sub(freed)
        } else {
            let held = self.held_bytes.load(Ordering::Relaxed);
            bytes.min(held.saturating_sub(KEEP_BYTES))
        };
        evicted.extend(self.evict_oldest_where(&mut free, want, |v| {
            !keep_huge || Self::bytes_of(v) < HUGE_BYTES
        }));
        drop(free);
        drop(evicted); // returned to the allocator outside the lock
        None
    }

    /// Remove every held buffer of at least `HUGE_BYTES`; return them and
    /// their bytes.
    fn evict_huge(&self, free: &mut Vec<Vec<T>>) -> (Vec<Vec<T>>, usize) {
        let huge: Vec<Vec<T>> = free
            .extract_if(.., |v| Self::bytes_of(v) >= HUGE_BYTES)
            .collect();
        let freed = huge.iter().map(Self::bytes_of).sum();
        self.held_bytes.fetch_sub(freed, Ordering::Relaxed);
        (huge, freed)
    }

    /// Remove the oldest held buffers until at least `bytes` are freed (or
    /// none is left) and return them.
    fn evict_oldest(&self, free: &mut Vec<Vec<T>>, bytes: usize) -> Vec<Vec<T>> {
        self.evict_oldest_where(free, bytes, |_| true)
    }

    /// [`Self::evict_oldest`] over the held buffers that `may_go` allows.
    fn evict_oldest_where(
        &self,
        free: &mut Vec<Vec<T>>,
        bytes: usize,
        may_go: impl Fn(&Vec<T>) -> bool,
    ) -> Vec<Vec<T>> {
        let mut evicted = Vec::new();
        let mut freed = 0;
        let mut at = 0;
        while freed < bytes && at < free.len() {
            if may_go(&free[at]) {
                let old = free.remove(at);
                freed += Self::bytes_of(&old);
                evicted.push(old);
            } else {
                at += 1;
            }
        }
        self.held_bytes.fetch_sub(freed, Ordering::Relaxed);
        evicted
    }

    fn give(&self, v: Vec<T>) {
        let bytes = Self::bytes_of(&v);
        if !(MIN_POOLED_BYTES..=LIMIT_BYTES).contains(&bytes) {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let over = (self.held_bytes.load(Ordering::Relaxed) + bytes).saturating_sub(LIMIT_BYTES);
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
        && let Some(v) = T::pool().take(len, in_backward())
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

    fn held_bytes(p: &Pool<f32>) -> usize {
        p.held_bytes.load(Ordering::Relaxed)
    }

    /// `len` f32 zeros with room for `cap` (calloc'd: the pages of a large
    /// one are not touched).
    fn buffer(len: usize, cap: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; cap];
        v.truncate(len);
        v
    }

    #[test]
    fn a_request_takes_the_smallest_held_buffer_within_an_eighth() {
        let p = Pool::<f32>::new();
        let len = MIN_POOLED_BYTES / 4 * 8; // 8 MiB of f32
        let most = len + len / 8;
        p.give(vec![0.0; most + 1]);
        p.give(vec![0.0; most]);
        p.give(vec![0.0; len + 5]);
        let newest = vec![0.0; len + 5];
        let newest_at = newest.as_ptr();
        p.give(newest);
        assert_eq!(held_bytes(&p), (most + 1 + most + 2 * (len + 5)) * 4);
        // The smallest that fits, the newest of two equals, cut to `len`.
        let v = p.take(len, false).expect("a held buffer fits");
        assert_eq!(
            (v.len(), v.capacity(), v.as_ptr()),
            (len, len + 5, newest_at)
        );
        assert_eq!(p.take(len, false).map(|v| v.capacity()), Some(len + 5));
        // An eighth to spare is still a fit; one element more is not.
        assert_eq!(p.take(len, false).map(|v| v.capacity()), Some(most));
        assert!(p.take(len, false).is_none());
        assert_eq!(held(&p), [most + 1]);
        // A request longer than every held buffer misses, one that fits
        // exactly hits.
        assert!(p.take(most + 2, false).is_none());
        assert_eq!(p.take(most + 1, false).map(|v| v.len()), Some(most + 1));
        assert_eq!(held_bytes(&p), 0);
    }

    #[test]
    fn a_buffer_given_back_short_is_counted_and_grown_by_its_capacity() {
        let p = Pool::<f32>::new();
        let cap = MIN_POOLED_BYTES / 4 * 3;
        // Its length alone is below the pooled size: its capacity counts.
        let v = buffer(10, cap);
        let at = v.as_ptr();
        p.give(v);
        assert_eq!(held_bytes(&p), cap * 4);
        // Served at full length from the same allocation.
        let v = p.take(cap, false).expect("held by capacity");
        assert_eq!((v.len(), v.capacity(), v.as_ptr()), (cap, cap, at));
        assert_eq!(held_bytes(&p), 0);
    }

    #[test]
    fn a_small_miss_frees_the_oldest_as_many_bytes_while_more_than_keep_is_held() {
        let p = Pool::<f32>::new();
        let mib = MIN_POOLED_BYTES / 4; // one MiB of f32
        let block = 50 * mib; // below HUGE_BYTES
        for _ in 0..5 {
            p.give(vec![0.0; block]);
        }
        p.give(vec![0.0; mib]); // the newest
        let held0 = held_bytes(&p);
        assert_eq!(held0, 251 * MIN_POOLED_BYTES);
        assert!(held0 > KEEP_BYTES && held0 - KEEP_BYTES > 10 * MIN_POOLED_BYTES);
        // 10 MiB fresh: the oldest 50 MiB go (at least 10 MiB, whole buffers).
        assert!(p.take(10 * mib, false).is_none());
        assert_eq!(held(&p), [block, block, block, block, mib]);
        // 201 MiB held: only the 9 MiB above KEEP_BYTES are wanted, one block.
        assert_eq!(held_bytes(&p), KEEP_BYTES + 9 * MIN_POOLED_BYTES);
        assert!(p.take(10 * mib, false).is_none());
        assert_eq!(held(&p), [block, block, block, mib]);
        // At or below KEEP_BYTES a small miss frees nothing.
        assert!(p.take(10 * mib, false).is_none());
        assert_eq!(held(&p), [block, block, block, mib]);
    }

    #[test]
    fn a_miss_frees_every_held_huge_buffer() {
        let p = Pool::<f32>::new();
        let mib = MIN_POOLED_BYTES / 4;
        let huge = HUGE_BYTES / 4;
        p.give(vec![0.0; mib]);
        p.give(vec![0.0; huge]);
        p.give(vec![0.0; 2 * mib]);
        p.give(vec![0.0; huge + 1]);
        // A small miss, far below KEEP_BYTES: the huge ones go all the same.
        assert!(p.take(3 * mib, false).is_none());
        assert_eq!(held(&p), [mib, 2 * mib]);
        assert_eq!(held_bytes(&p), 3 * MIN_POOLED_BYTES);
        // A hit frees nothing.
        assert_eq!(p.take(2 * mib, false).map(|v| v.len()), Some(2 * mib));
        assert_eq!(held(&p), [mib]);
    }

    #[test]
    fn held_huge_buffers_outlive_small_misses_after_a_huge_hit_outside_backward() {
        let p = Pool::<f32>::new();
        let mib = MIN_POOLED_BYTES / 4;
        let huge = HUGE_BYTES / 4;
        for _ in 0..4 {
            p.give(vec![0.0; huge]);
        }
        p.give(vec![0.0; mib]);
        // A forward pass: a huge hit, then small misses leave the other
        // huge buffers for the next huge requests. The 1 MiB held above
        // KEEP_BYTES goes from the small ones, though the huge are older.
        assert_eq!(p.take(huge, false).map(|v| v.len()), Some(huge));
        assert_eq!(held_bytes(&p), KEEP_BYTES + MIN_POOLED_BYTES);
        assert!(p.take(3 * mib, false).is_none());
        assert_eq!(held(&p), [huge, huge, huge]);
        assert_eq!(p.take(huge, false).map(|v| v.len()), Some(huge));
        p.give(vec![0.0; mib]);
        assert!(p.take(3 * mib, false).is_none());
        assert_eq!(held(&p), [huge, huge, mib]);
        // In a backward pass a small miss frees them, hit or not.
        assert!(p.take(3 * mib, true).is_none());
        assert_eq!(held(&p), [mib]);
        // After a huge miss, so does a small miss outside one.
        p.give(vec![0.0; 2 * huge]);
        assert!(p.take(4 * huge, false).is_none());
        assert!(held(&p).is_empty());
        p.give(vec![0.0; huge]);
        assert!(p.take(3 * mib, false).is_none());
        assert!(held(&p).is_empty());
        assert_eq!(held_bytes(&p), 0);
    }

    #[test]
    fn no_backward_pass_is_known_once_every_guard_is_dropped() {
        // Other tests' passes may be running: wait for a moment with none
        // (each is short) instead of asserting at once. A guard that never
        // let go, or a flag always set, waits out the minute and fails.
        drop(BackwardPass::begin());
        let start = std::time::Instant::now();
        while in_backward() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "a backward pass is still counted after a minute"
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_backward_pass_is_known_to_the_pool_while_it_runs() {
        // Other tests' passes may run at the same time: only "at least
        // this one" can be asserted.
        let pass = BackwardPass::begin();
        assert!(in_backward());
        let more = BackwardPass::begin();
        assert!(BACKWARD_PASSES.load(Ordering::Relaxed) >= 2);
        drop((pass, more));
    }

    #[test]
    fn a_huge_miss_frees_at_least_its_bytes_huge_buffers_first_then_the_oldest() {
        let p = Pool::<f32>::new();
        let mib = MIN_POOLED_BYTES / 4;
        let huge = HUGE_BYTES / 4;
        p.give(vec![0.0; 20 * mib]);
        p.give(vec![0.0; 30 * mib]);
        p.give(vec![0.0; huge + 16 * mib]); // 80 MiB
        p.give(vec![0.0; 40 * mib]);
        // 100 MiB fresh: the 80 MiB huge buffer, then 20 MiB of the oldest.
        assert!(p.take(huge + 36 * mib, false).is_none());
        assert_eq!(held(&p), [30 * mib, 40 * mib]);
        // 100 MiB fresh again: 70 MiB held, all of it goes.
        assert!(p.take(huge + 36 * mib, false).is_none());
        assert!(held(&p).is_empty());
        assert_eq!(held_bytes(&p), 0);
        // A huge hit is still a hit.
        p.give(vec![0.0; huge]);
        assert_eq!(p.take(huge, false).map(|v| v.len()), Some(huge));
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
        let again = p.take(len, false).expect("the freed buffer should be kept");
        assert_eq!(again.as_ptr(), ptr, "the same buffer handed out again");
        p.give(vec![1.5f64; 10]);
        assert!(p.take(10, false).is_none(), "small buffers are not kept");
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
