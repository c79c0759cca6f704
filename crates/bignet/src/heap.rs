//! Keeps freed activation buffers in the process instead of handing them back to the OS.
//!
//! A training step allocates and frees dozens of 4 MB tensors (activations, gradients).
//! glibc serves each such block with a fresh `mmap` and unmaps it on free, so every step
//! page-faults and zeroes all of them again: about 30 000 page faults per BigNet LoRA step at
//! batch 1000. [`retain_freed_memory`] raises glibc's mmap threshold to 32 MiB (its maximum)
//! and its trim threshold to 1 GiB, so those blocks are recycled from the heap: 260 000 ->
//! 37 000 page faults over a `bignet bench lora --train` run. The process's resident size then
//! stays at its peak rather than shrinking between steps; the allocated bytes that
//! [`crate::memory`] counts are unchanged.

/// Applies the settings above (glibc on Linux only; elsewhere it does nothing). Call it once,
/// early in `main`; returns whether the allocator accepted them.
///
/// ```
/// let _accepted = nibble_bignet::heap::retain_freed_memory();
/// ```
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are in range (the
        // mmap threshold may not exceed 32 MiB on 64-bit glibc).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
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
