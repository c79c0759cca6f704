//! Where a microkernel reads its operands, as compile-time choices: A from a packed micro-panel
//! or straight from the strided matrix, B from packed panels or straight from a row-major
//! matrix.
//!
//! Every kernel body is generic over an [`ARows`] and a [`BCols`] and touches its operands only
//! through them: per step `p` of K it reads element `(i, p)` of A at [`ARows::at`]`(i)` (one
//! broadcast per row) and the `NR` floats `(p, u * NR ..)` of B at [`BCols::at`]`(u)`, then
//! steps both. The packed sources have constant strides ([`PackedA`]`<R>` steps by `R` floats,
//! [`PackedB`] by [`NR`]), so their monomorphized bodies compile as before; the direct ones
//! ([`StridedA`], [`DirectB`]) step by the matrix's strides. Both read the same values in the
//! same order, so a kernel gives the same bits either way.
//!
//! The driver passes an [`ASrc`] and a [`BSrc`] (plain values) down to the kernel's
//! `#[target_feature]` wrapper, which turns them into the concrete types with [`dispatch`].

use super::NR;

/// Most rows a kernel tile has (the AVX-512 shapes go up to 14).
pub(crate) const MAX_ROWS: usize = 16;

/// The A side of one microkernel call, positioned at one step of K.
pub(crate) trait ARows: Copy {
    /// Address of element `(i, p)` of A for the current step `p`, `i < R` (the tile's rows).
    ///
    /// # Safety
    /// The source's construction contract (its rows and remaining steps are readable).
    unsafe fn at(&self, i: usize) -> *const f32;
    /// Moves to the next step of K.
    ///
    /// # Safety
    /// At most the number of steps the source was built for.
    unsafe fn step(&mut self);
}

/// The B side of one microkernel call, positioned at one step of K.
pub(crate) trait BCols: Copy {
    /// Address of the [`NR`] floats of B for panel `u` (columns `u * NR ..`) at the current
    /// step.
    ///
    /// # Safety
    /// The source's construction contract (its panels and remaining steps are readable).
    unsafe fn at(&self, u: usize) -> *const f32;
    /// Moves to the next step of K.
    ///
    /// # Safety
    /// At most the number of steps the source was built for.
    unsafe fn step(&mut self);
}

/// A packed A micro-panel of `R` rows: element `(i, p)` at `ptr[p * R + i]`.
#[derive(Clone, Copy)]
pub(crate) struct PackedA<const R: usize>(*const f32);

impl<const R: usize> ARows for PackedA<R> {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> *const f32 {
        // SAFETY: the caller keeps i < R inside the packed panel.
        unsafe { self.0.add(i) }
    }
    #[inline(always)]
    unsafe fn step(&mut self) {
        // SAFETY: the caller stays inside the panel (the pointer may end one past it).
        self.0 = unsafe { self.0.add(R) };
    }
}

/// Rows of A read in place: element `(i, p)` at `ptr + off[i] + p * cs`. Rows past the
/// matrix's edge repeat its last row (their results are computed and dropped, as a packed
/// panel's zero rows are), so no address outside A is formed.
#[derive(Clone, Copy)]
pub(crate) struct StridedA {
    ptr: *const f32,
    cs: usize,
    off: [usize; MAX_ROWS],
}

impl ARows for StridedA {
    #[inline(always)]
    unsafe fn at(&self, i: usize) -> *const f32 {
        // SAFETY: per ASrc::Strided's contract, row offset off[i] at the current step is an
        // element of A.
        unsafe { self.ptr.add(self.off[i]) }
    }
    #[inline(always)]
    unsafe fn step(&mut self) {
        // wrapping: after the last step the pointer may pass A's end, it is not read again.
        self.ptr = self.ptr.wrapping_add(self.cs);
    }
}

/// Packed B panels: panel `u`'s row `p` at `ptr + u * panel_stride + p * NR`.
#[derive(Clone, Copy)]
pub(crate) struct PackedB {
    ptr: *const f32,
    panel_stride: usize,
}

impl BCols for PackedB {
    #[inline(always)]
    unsafe fn at(&self, u: usize) -> *const f32 {
        // SAFETY: the caller keeps u below the panels there are.
        unsafe { self.ptr.add(u * self.panel_stride) }
    }
    #[inline(always)]
    unsafe fn step(&mut self) {
        // SAFETY: the caller stays inside the panel (the pointer may end one past it).
        self.ptr = unsafe { self.ptr.add(NR) };
    }
}

/// One packed B panel: row `p` at `ptr + p * NR` (a [`PackedB`] of one panel, without the
/// panel stride, so that a one-panel kernel takes one pointer for B, as before sources).
#[derive(Clone, Copy)]
pub(crate) struct PackedPanel(*const f32);

impl BCols for PackedPanel {
    #[inline(always)]
    unsafe fn at(&self, _u: usize) -> *const f32 {
        self.0
    }
    #[inline(always)]
    unsafe fn step(&mut self) {
        // SAFETY: the caller stays inside the panel (the pointer may end one past it).
        self.0 = unsafe { self.0.add(NR) };
    }
}

/// B read in place from a row-major matrix: `(p, u * NR + j)` at `ptr + p * ld + u * NR + j`.
#[derive(Clone, Copy)]
pub(crate) struct DirectB {
    ptr: *const f32,
    ld: usize,
}

impl BCols for DirectB {
    #[inline(always)]
    unsafe fn at(&self, u: usize) -> *const f32 {
        // SAFETY: per BSrc::Direct's contract, the panels' columns lie inside B.
        unsafe { self.ptr.add(u * NR) }
    }
    #[inline(always)]
    unsafe fn step(&mut self) {
        // wrapping: after the last step the pointer may pass B's end, it is not read again.
        self.ptr = self.ptr.wrapping_add(self.ld);
    }
}

/// Where a microkernel call reads A (a plain value the driver passes down).
#[derive(Clone, Copy)]
pub(crate) enum ASrc {
    /// A packed micro-panel of the kernel's height, readable for `kc` steps.
    Packed(*const f32),
    /// Element `(i, p)` at `ptr + min(i, rows - 1) * rs + p * cs`: the `rows` (>= 1) rows of
    /// the tile that exist in A, each readable for `kc` steps.
    Strided {
        /// Element `(0, 0)` of the tile.
        ptr: *const f32,
        /// Row stride.
        rs: usize,
        /// Column stride (one step of K).
        cs: usize,
        /// Rows of the tile inside A.
        rows: usize,
    },
}

/// Where a microkernel call reads B (a plain value the driver passes down).
#[derive(Clone, Copy)]
pub(crate) enum BSrc {
    /// Packed panels `panel_stride` floats apart, each readable for `kc * NR` floats.
    Packed {
        /// Row 0 of panel 0.
        ptr: *const f32,
        /// Floats from one panel to the next.
        panel_stride: usize,
    },
    /// A row-major matrix with row stride `ld`: for each of `kc` steps, all the columns of
    /// the panels the call reads (`panels * NR` floats) are inside B.
    Direct {
        /// Element `(0, 0)` of the tile's columns.
        ptr: *const f32,
        /// Row stride.
        ld: usize,
    },
}

/// A microkernel body to run once its sources have concrete types (a generic closure).
pub(crate) trait Kernel {
    /// Runs the body on `a` and `b`.
    ///
    /// # Safety
    /// The kernel's own contract, with `a` and `b` per their sources' contracts.
    unsafe fn run<A: ARows, B: BCols>(self, a: A, b: B);
}

/// Runs `k` with `a` and `b` turned into their concrete source types, `R` being the kernel's
/// row count (the packed panel's height) and `NP` the number of B panels it reads (one:
/// packed B is a [`PackedPanel`]). Four monomorphized bodies per kernel, chosen once per call.
///
/// # Safety
/// `k`'s contract, with `a` and `b` per [`ASrc`]'s and [`BSrc`]'s; `R <= MAX_ROWS`; `k`
/// reads `NP` panels of B.
#[inline(always)]
pub(crate) unsafe fn dispatch<const R: usize, const NP: usize, K: Kernel>(a: ASrc, b: BSrc, k: K) {
    // SAFETY: forwarded contract.
    unsafe {
        match a {
            ASrc::Packed(p) => with_b::<NP, _, _>(PackedA::<R>(p), b, k),
            ASrc::Strided { ptr, rs, cs, rows } => {
                let last = rows.clamp(1, R) - 1;
                let off = std::array::from_fn(|i| i.min(last) * rs);
                with_b::<NP, _, _>(StridedA { ptr, cs, off }, b, k)
            }
        }
    }
}

/// [`dispatch`]'s B half.
///
/// # Safety
/// As [`dispatch`].
#[inline(always)]
unsafe fn with_b<const NP: usize, A: ARows, K: Kernel>(a: A, b: BSrc, k: K) {
    // SAFETY: forwarded contract.
    unsafe {
        match b {
            BSrc::Packed { ptr, .. } if NP == 1 => k.run(a, PackedPanel(ptr)),
            BSrc::Packed { ptr, panel_stride } => k.run(a, PackedB { ptr, panel_stride }),
            BSrc::Direct { ptr, ld } => k.run(a, DirectB { ptr, ld }),
        }
    }
}
