//! The kernel tiers, one module each: a tier implements the kernels of every format side by
//! side (as ggml keeps `ggml-cpu/arch/x86` apart from `ggml-quants.c`), so adding a tier is
//! adding a module here. The format modules (`q4`, `nf4`, `lower`, `int8`) keep the block
//! layout, the scalar reference (`*_ref`) and the tier-independent logic, and dispatch to these.

/// `$body` with the constant `$v` the number of prepared vectors in `$preps` (2 to 8) and
/// `$arr` those preparations as an array of that length, then `true`; `false`, the body not
/// run, for another count. The small-batch kernels keep one accumulator per vector in
/// registers, so each count is an instance of its own; this picks it.
#[cfg(target_arch = "x86_64")]
macro_rules! with_batch_count {
    ($preps:expr, $v:ident, $arr:ident => $body:expr) => {
        with_batch_count!(@arms $preps, $v, $arr, $body, 2 3 4 5 6 7 8)
    };
    (@arms $preps:expr, $v:ident, $arr:ident, $body:expr, $($n:literal)*) => {
        match $preps.len() {
            $($n => {
                const $v: usize = $n;
                let $arr: [&[f32]; $v] = $preps.try_into().expect("the arm's count");
                $body;
                true
            })*
            _ => false,
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod portable;
