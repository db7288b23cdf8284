//! `pool::tune_allocator` observed from outside: in a test binary of its
//! own (one test, so no other test thread allocates meanwhile), glibc's
//! count of mmapped blocks shows whether a large allocation got its own
//! mapping (what the tuning is for: freed at once, not kept in an arena).
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

#[test]
fn after_tuning_a_large_block_gets_its_own_mapping() {
    // Freeing a mapped 16 MiB block raises glibc's adaptive threshold to
    // 16 MiB: a 2 MiB block then comes from the heap, where its pages stay
    // resident after it is freed.
    drop(black_box(vec![1u8; 16 << 20]));
    assert_eq!(mappings_of_a_block(2), 0, "untuned: from the heap");
    assert!(dmkd::tune_allocator());
    // glibc maps a block only when the heap's free top cannot hold it (the
    // 2 MiB just freed can), so the tuned probe asks for more than that;
    // untuned, 8 MiB would still come from the heap.
    assert_eq!(mappings_of_a_block(8), 1, "tuned: its own mapping");
}
