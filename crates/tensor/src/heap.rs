//! Keeps freed activation buffers in the process instead of handing them back to the OS.
//!
//! A training step allocates and frees dozens of 4 MB tensors (activations, gradients).
//! glibc serves each such block with a fresh `mmap` and unmaps it on free, so every step
//! page-faults and zeroes all of them again: about 30 000 page faults per BigNet LoRA step at
//! batch 1000. [`retain_freed_memory`] raises glibc's mmap threshold to 32 MiB (its maximum)
//! and its trim threshold to 1 GiB, so those blocks are recycled from the heap: 260 000 ->
//! 37 000 page faults over a `bignet bench lora --train` run.
//!
//! It also keeps every thread on glibc's main arena (`M_ARENA_MAX` 1). A training step runs
//! on a worker of the rayon pool, and a worker's own arena grows by 64 MiB heaps that glibc
//! unmaps again as soon as one is empty, whatever the trim threshold: each step page-faulted
//! its activations afresh there (`examples/train_profile.rs lora`, 2 threads: 105 500 ->
//! 31 500 page faults over the run). On the 16-core Xeon (2026-12-04 11:55 UTC, two rounds
//! in turns, `MALLOC_ARENA_MAX=1` against none) the forward of a LoRA training step took
//! 45.6 / 44.8 ms against 56.0 / 51.0 (its ReLUs 2.0 against 4.3 ms, LayerNorms 0.9 against
//! 2.1), `bignet bench --train` lora 98.6 / 92.4 against 106.5 / 99.4 ms, qlora 96.2 / 90.5
//! against 98.6 / 93.5, qlora with int8 activations 60.2 / 57.2 against 70.4 / 64.3. The
//! hot kernels do not allocate (their buffers are per-thread and kept), so the one arena's
//! lock is not contended.
//!
//! The process's resident size then stays at its peak rather than shrinking between steps;
//! the allocated bytes that `nibble_bignet::memory` counts are unchanged. The `bignet` and
//! `nibble` programs call it first thing.

/// Applies the settings above (glibc on Linux only; elsewhere it does nothing). Call it once,
/// early in `main`; returns whether the allocator accepted them.
///
/// ```
/// let _accepted = nibble_tensor::heap::retain_freed_memory();
/// ```
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; every value is in range (the
        // mmap threshold may not exceed 32 MiB on 64-bit glibc; one arena is the least).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(super::retain_freed_memory());
    }
}
