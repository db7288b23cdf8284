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
//! first), so its contribution to peak memory is bounded.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Buffers smaller than this are not worth pooling.
pub const MIN_POOLED_BYTES: usize = 1 << 20;

/// Bound on the bytes the pool holds (a P3 activation is 34 MB).
pub const LIMIT_BYTES: usize = 256 << 20;

/// Element types with a process-wide pool: f32 and f64. (The pool looks
/// only at lengths and bytes; `tensor::Float` requires this trait, so the
/// pool knows nothing of tensors.)
pub trait PoolElem: Copy + Default + Send + 'static {
    /// The pool of this element type.
    fn pool() -> &'static Pool<Self>;
}

impl PoolElem for f32 {
    fn pool() -> &'static Pool<Self> {
        static POOL: Pool<f32> = Pool::new();
        &POOL
    }
}

impl PoolElem for f64 {
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

    fn take(&self, len: usize) -> Option<Vec<T>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let pos = free.iter().rposition(|v| v.len() == len)?;
        let v = free.swap_remove(pos);
        self.held_bytes
            .fetch_sub(len * std::mem::size_of::<T>(), Ordering::Relaxed);
        Some(v)
    }

    fn give(&self, v: Vec<T>) {
        let bytes = v.len() * std::mem::size_of::<T>();
        let limit = LIMIT_BYTES;
        if bytes < MIN_POOLED_BYTES || bytes > limit {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = self.held_bytes.load(Ordering::Relaxed);
        while held + bytes > limit && !free.is_empty() {
            let old = free.remove(0);
            held -= old.len() * std::mem::size_of::<T>();
        }
        free.push(v);
        self.held_bytes.store(held + bytes, Ordering::Relaxed);
    }
}

/// A vector of `len` elements whose contents are unspecified (stale values
/// of an earlier tensor, or zeros): the caller must overwrite every element.
pub fn take<T: PoolElem>(len: usize) -> Vec<T> {
    if len * std::mem::size_of::<T>() >= MIN_POOLED_BYTES
        && let Some(v) = T::pool().take(len)
    {
        return v;
    }
    vec![T::default(); len]
}

/// A vector of `len` zeros (`T::default()`), recycled when possible.
pub fn take_zeroed<T: PoolElem>(len: usize) -> Vec<T> {
    let mut v = take(len);
    v.fill(T::default());
    v
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

    #[test]
    fn large_buffers_are_recycled_small_ones_are_not() {
        // f64 pool, a length no other test in this binary uses.
        let len = (MIN_POOLED_BYTES / 8) + 12345;
        let v = vec![1.5f64; len];
        let ptr = v.as_ptr();
        drop(Buffer::new(v));
        let again = take::<f64>(len);
        assert_eq!(
            again.as_ptr(),
            ptr,
            "the freed buffer should be handed out again"
        );
        let small = take::<f64>(10);
        assert!(small.iter().all(|&x| x == 0.0));
        let z = take_zeroed::<f64>(len);
        assert!(z.iter().all(|&x| x == 0.0));
    }
}
