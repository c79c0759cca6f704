//! A counting global allocator, so that memory figures are measured, not computed from shapes.
//! A program opts in with
//! `#[global_allocator] static ALLOC: nibble_bignet::memory::CountingAlloc = nibble_bignet::memory::CountingAlloc;`
//! and then reads [`current`] and [`peak`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A counter alone on its cache line: every thread's allocations update [`CURRENT`], and a
/// write to a line that also held [`PEAK`] or [`INSTALLED`] would take those from every other
/// core's cache as well.
#[repr(align(64))]
struct Line<T>(T);

static CURRENT: Line<AtomicUsize> = Line(AtomicUsize::new(0));
static PEAK: Line<AtomicUsize> = Line(AtomicUsize::new(0));
static INSTALLED: Line<AtomicBool> = Line(AtomicBool::new(false));

/// The system allocator, counting bytes held and their peak.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAlloc;

/// Counts `n` bytes more held. The peak line is written only when the count passes it (a
/// read of an unchanged line costs nothing on the other cores), so that the team of a
/// batch-1 forward, whose members each allocate a few small buffers per layer at the same
/// moment, does not queue for it.
fn add(n: usize) {
    let now = CURRENT.0.fetch_add(n, Ordering::Relaxed) + n;
    if now > PEAK.0.load(Ordering::Relaxed) {
        PEAK.0.fetch_max(now, Ordering::Relaxed);
    }
}

/// Records that this allocator is in use (written once: a store per allocation would take
/// the line from every other core each time).
fn mark_installed() {
    if !INSTALLED.0.load(Ordering::Relaxed) {
        INSTALLED.0.store(true, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the counters are plain atomics and never affect the returned memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (through this allocator).
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.0.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; `ptr`/`layout` come from this allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.0.fetch_sub(layout.size(), Ordering::Relaxed);
            add(new_size);
        }
        p
    }
}

/// Whether the counting allocator is the program's global allocator (else figures are 0).
pub fn is_installed() -> bool {
    INSTALLED.0.load(Ordering::Relaxed)
}

/// Bytes currently allocated.
pub fn current() -> usize {
    CURRENT.0.load(Ordering::Relaxed)
}

/// The highest [`current`] since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.0.load(Ordering::Relaxed)
}

/// Restarts peak tracking from the current figure.
pub fn reset_peak() {
    PEAK.0
        .store(CURRENT.0.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Runs `f` and returns its result with the peak bytes it allocated beyond what was held
/// before it started.
pub fn measure_peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = current();
    reset_peak();
    let out = f();
    (out, peak().saturating_sub(before))
}
