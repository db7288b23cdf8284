//! `pool::tune_allocator` observed from outside: in a test binary of its
//! own (one test, so no other test thread allocates meanwhile), glibc's
//! count of mmapped blocks shows whether a large allocation got its own
//! mapping (what the tuning is for: freed at once, not kept in an arena),
//! and its count of free bytes whether a small block's pages stay in the
//! heap once freed (not given back and faulted in again by the next one).
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::hint::black_box;

/// Blocks glibc serves with their own `mmap`, process-wide.
fn mmapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

/// Mapped blocks added by one live allocation of `mib` MiB.
fn mappings_of_a_block(mib: usize) -> usize {
    let before = mmapped_blocks();
    let v = black_box(vec![1u8; mib << 20]);
    let during = mmapped_blocks();
    drop(v);
    during.saturating_sub(before)
}

/// Free bytes in glibc's heaps, process-wide (the free top included).
fn free_heap_bytes() -> usize {
    // SAFETY: as in `mmapped_blocks`.
    unsafe { libc::mallinfo2() }.fordblks
}

/// Whether a block of `kib` KiB (under the tuned mmap threshold, so from a
/// heap) is still held free in a heap after it is dropped, rather than
/// trimmed off the heap's top and given back.
fn heap_keeps_a_freed_block(kib: usize) -> bool {
    drop(black_box(vec![1u8; kib << 10]));
    free_heap_bytes() >= kib << 10
}

#[test]
fn after_tuning_a_large_block_gets_its_own_mapping_and_a_small_one_stays_in_the_heap() {
    // Freeing a mapped 16 MiB block raises glibc's adaptive threshold to
    // 16 MiB: a 2 MiB block then comes from the heap, where its pages stay
    // resident after it is freed.
    drop(black_box(vec![1u8; 16 << 20]));
    assert_eq!(mappings_of_a_block(2), 0, "untuned: from the heap");
    // glibc's default trim threshold (the step above raised it with the
    // mmap threshold): a freed block at the heap's top larger than it is
    // trimmed off, so the probe can fail.
    // SAFETY: mallopt only sets a tunable of glibc's allocator.
    assert_eq!(
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10) },
        1
    );
    assert!(!heap_keeps_a_freed_block(768), "a 128 KiB trim threshold");
    assert!(dmkd::tune_allocator());
    // glibc maps a block only when the heap's free top cannot hold it (the
    // 2 MiB just freed can), so the tuned probe asks for more than that;
    // untuned, 8 MiB would still come from the heap.
    assert_eq!(mappings_of_a_block(8), 1, "tuned: its own mapping");
    // Under the mmap threshold: from the heap, and kept there once freed.
    assert!(heap_keeps_a_freed_block(768), "tuned: kept in the heap");
}
