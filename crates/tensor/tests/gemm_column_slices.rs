//! The GEMM driver's column-slice switches (`NIBBLE_GEMM_SLICES=1` with a stage of all of K,
//! `NIBBLE_GEMM_STAGE_FLOATS`): read once per process, so this file holds one test, which sets
//! them before its first product. With them, a parallel product of 192 rows or more whose B is
//! packed per call takes the held grid with its tasks ordered by column slice; every element of
//! C must still be written once (C starts as NaN), with the bits of one thread (which never
//! slices), and near an f64 reference.

mod common;

#[test]
fn column_slices_give_the_bits_of_one_thread() {
    // The only test of this binary: nothing has read the switches yet.
    std::env::set_var("NIBBLE_GEMM_SLICES", "1");
    std::env::set_var("NIBBLE_GEMM_STAGE_FLOATS", "1048576");
    common::switches::parallel_products_give_the_bits_of_one_thread();
}
