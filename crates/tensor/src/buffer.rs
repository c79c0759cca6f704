//! [`WeightBuf`]: owned storage for large, read-mostly weight arrays, placed on 2 MiB
//! transparent huge pages where the OS allows it.
//!
//! A batch-1 forward streams every weight from DRAM once. With 4 KiB pages the hardware
//! prefetchers restart at every page and every page costs a TLB walk; a buffer of at least
//! [`HUGE_PAGE_BYTES`] is therefore aligned to 2 MiB and, on Linux, advised
//! `MADV_HUGEPAGE` *before* its pages are first touched (the kernel then backs it with huge
//! pages at fault time, also under the default `transparent_hugepage=madvise` setting).
//! Measured on 18 f16 1024x1024 layers (36 MB) at batch 1, 2 threads: 1.87 -> 1.75 ms.
//!
//! The allocation goes through the global allocator (so counting allocators see exactly
//! `len * size_of::<T>()` bytes); the advice is only a hint and is skipped when
//! `NIBBLE_HUGE_PAGES=0` is set or on other systems.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::OnceLock;

/// Buffers of at least this many bytes are 2 MiB-aligned and advised to use huge pages.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Whether large buffers ask for huge pages (`NIBBLE_HUGE_PAGES=0` turns it off; read once).
pub fn huge_pages_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("NIBBLE_HUGE_PAGES").map_or(true, |v| v.trim() != "0"))
}

/// An owned, fixed-length array of plain-old-data values (zero-initialised on creation),
/// dereferencing to a slice. Large arrays sit on huge pages (see the module docs).
///
/// ```
/// use nibble_tensor::buffer::WeightBuf;
/// let mut b = WeightBuf::<f32>::zeroed(3);
/// b[1] = 2.5;
/// assert_eq!(&b[..], &[0.0, 2.5, 0.0]);
/// assert_eq!(WeightBuf::from_slice(&[1u16, 2]).to_vec(), vec![1, 2]);
/// ```
pub struct WeightBuf<T: bytemuck::Pod> {
    ptr: NonNull<T>,
    len: usize,
}

// SAFETY: WeightBuf owns its allocation exclusively (like Vec<T>); T is Pod, so Send + Sync.
unsafe impl<T: bytemuck::Pod + Send> Send for WeightBuf<T> {}
// SAFETY: shared access only hands out &[T]; T is Pod (no interior mutability).
unsafe impl<T: bytemuck::Pod + Sync> Sync for WeightBuf<T> {}

impl<T: bytemuck::Pod> WeightBuf<T> {
    /// The layout of `len` elements: 2 MiB-aligned from [`HUGE_PAGE_BYTES`] on, else on a
    /// 64-byte line (or `T`'s alignment where larger).
    /// `None` for zero bytes (no allocation) or when the size overflows.
    fn layout(len: usize) -> Option<Layout> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        if bytes == 0 {
            return None;
        }
        let align = if bytes >= HUGE_PAGE_BYTES && huge_pages_enabled() {
            HUGE_PAGE_BYTES
        } else {
            // A cache line at least: SIMD loads of packed weights then never straddle two.
            std::mem::align_of::<T>().max(64)
        };
        Layout::from_size_align(bytes, align).ok()
    }

    /// Room for `len` elements, not yet initialised (dangling for zero bytes), placed and
    /// advised as the module docs say before anything touches it. Panics (like
    /// `vec![0; len]`) if the size overflows `isize`, and calls the global allocation-error
    /// handler if memory runs out.
    fn allocate(len: usize) -> NonNull<T> {
        if len.checked_mul(std::mem::size_of::<T>()) == Some(0) {
            return NonNull::dangling();
        }
        let layout = Self::layout(len).expect("WeightBuf: capacity overflow");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw as *mut T) else {
            alloc::handle_alloc_error(layout)
        };
        if layout.align() == HUGE_PAGE_BYTES {
            advise_huge_pages(raw, layout.size());
        }
        ptr
    }

    /// [`allocate`](Self::allocate), or `None` where the layout overflows or the allocator
    /// has no such block (instead of a panic or an abort).
    fn try_allocate(len: usize) -> Option<NonNull<T>> {
        if len.checked_mul(std::mem::size_of::<T>()) == Some(0) {
            return Some(NonNull::dangling());
        }
        let layout = Self::layout(len)?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(raw as *mut T)?;
        if layout.align() == HUGE_PAGE_BYTES {
            advise_huge_pages(raw, layout.size());
        }
        Some(ptr)
    }

    /// `len` elements `f(0), f(1), ...` as [`from_fn`](Self::from_fn) gives them, or `None`
    /// where `len` elements cannot be allocated (the byte count overflows, or the allocator
    /// has no such block): for lengths from untrusted input.
    pub fn try_from_fn(len: usize, f: impl FnMut(usize) -> T) -> Option<Self> {
        let ptr = Self::try_allocate(len)?;
        Some(Self::fill_from_fn(ptr, len, f))
    }

    /// Writes `f(0), f(1), ...` into the `len` slots at `ptr` (from [`allocate`](Self::allocate)
    /// or [`try_allocate`](Self::try_allocate) for `len`).
    fn fill_from_fn(ptr: NonNull<T>, len: usize, mut f: impl FnMut(usize) -> T) -> Self {
        for i in 0..len {
            // SAFETY: the caller's allocation gave room for `len` Ts and i < len; `write` does
            // not read or drop the uninitialised slot.
            unsafe { ptr.as_ptr().add(i).write(f(i)) };
        }
        // Every one of the `len` elements is initialised now.
        WeightBuf { ptr, len }
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let ptr = Self::allocate(len);
        // SAFETY: `allocate` gave room for `len` Ts (nothing to write for zero bytes); all-zero
        // bytes are a valid T (Pod: Zeroable), so the buffer is initialised after this.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        WeightBuf { ptr, len }
    }

    /// A copy of `src` (written once: no zero-fill first).
    pub fn from_slice(src: &[T]) -> Self {
        let ptr = Self::allocate(src.len());
        // SAFETY: `allocate` gave room for `src.len()` Ts in a fresh allocation, which cannot
        // overlap `src`; after the copy every element is initialised.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.as_ptr(), src.len()) };
        WeightBuf {
            ptr,
            len: src.len(),
        }
    }

    /// `len` elements, element `i` being `f(i)`, called once per index in increasing order
    /// (written once: no zero-fill first). If `f` panics, the partly written buffer is leaked,
    /// never read or freed.
    ///
    /// ```
    /// use nibble_tensor::buffer::WeightBuf;
    /// assert_eq!(&WeightBuf::from_fn(3, |i| i as u32 * 10)[..], &[0, 10, 20]);
    /// ```
    pub fn from_fn(len: usize, f: impl FnMut(usize) -> T) -> Self {
        Self::fill_from_fn(Self::allocate(len), len, f)
    }

    /// The elements as a `Vec`.
    pub fn to_vec(&self) -> Vec<T> {
        self.as_ref().to_vec()
    }

    /// Whether the buffer was placed for huge pages (2 MiB-aligned and advised).
    pub fn is_huge_page_aligned(&self) -> bool {
        Self::layout(self.len).is_some_and(|l| l.align() == HUGE_PAGE_BYTES)
    }
}

/// Asks the kernel to back `[ptr, ptr + bytes)` with transparent huge pages. Best effort: a
/// kernel without THP (or a refusal) leaves ordinary pages, which are just as correct.
#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    // SAFETY: madvise only reads the range's mapping; `ptr` is 2 MiB- (so page-) aligned and
    // the range lies inside one live allocation. MADV_HUGEPAGE never changes the contents.
    unsafe {
        libc::madvise(ptr.cast(), bytes, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {}

impl<T: bytemuck::Pod> Drop for WeightBuf<T> {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `zeroed` with this same layout (a pure function of `len`
            // and the once-read setting).
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast(), layout) };
        }
    }
}

impl<T: bytemuck::Pod> Deref for WeightBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr points to `len` initialised Ts (or is dangling with a zero-byte size).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> DerefMut for WeightBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref; &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> AsRef<[T]> for WeightBuf<T> {
    fn as_ref(&self) -> &[T] {
        self
    }
}

impl<T: bytemuck::Pod> Clone for WeightBuf<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T: bytemuck::Pod + PartialEq> PartialEq for WeightBuf<T> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T: bytemuck::Pod + fmt::Debug> fmt::Debug for WeightBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self[..], f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_buffers_hold_their_values() {
        for len in [
            0usize,
            1,
            7,
            HUGE_PAGE_BYTES / 4 - 1,
            HUGE_PAGE_BYTES / 4 + 17,
        ] {
            let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b = WeightBuf::from_slice(&src);
            assert_eq!(b.len(), len);
            assert_eq!(&b[..], &src[..]);
            assert_eq!(b.clone(), b);
            let large = len * 4 >= HUGE_PAGE_BYTES && huge_pages_enabled();
            assert_eq!(b.is_huge_page_aligned(), large, "len {len}");
            if large {
                assert_eq!(b.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
            }
        }
    }

    #[test]
    fn from_fn_writes_every_index_in_order() {
        for len in [0usize, 1, 7, HUGE_PAGE_BYTES / 4 + 3] {
            let mut next = 0;
            let b = WeightBuf::from_fn(len, |i| {
                assert_eq!(i, next, "indices in increasing order");
                next += 1;
                i as f32 * 0.25
            });
            assert_eq!(next, len);
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32 * 0.25));
            assert_eq!(
                b.is_huge_page_aligned(),
                len * 4 >= HUGE_PAGE_BYTES && huge_pages_enabled()
            );
        }
    }

    #[test]
    fn zero_sized_elements_and_empty_buffers_do_not_allocate() {
        let e = WeightBuf::<u8>::zeroed(0);
        assert!(e.is_empty());
        assert_eq!(format!("{e:?}"), "[]");
        let z = WeightBuf::<()>::zeroed(5);
        assert_eq!(z.len(), 5);
    }
}
