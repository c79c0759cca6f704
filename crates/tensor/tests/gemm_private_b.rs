//! The GEMM driver's switch for tasks that pack their own B (`NIBBLE_GEMM_PRIVATE_B`): read
//! once per process, so this file holds one test, which sets it before its first product. With
//! it, a parallel product of 192 rows or more whose B is packed per call runs one task per
//! thread, each packing the B panels it reads into a buffer of its own; every element of C
//! must still be written once, with the bits of one thread, and near an f64 reference.

mod common;

#[test]
fn tasks_packing_their_own_b_give_the_bits_of_one_thread() {
    // The only test of this binary: nothing has read the switch yet.
    std::env::set_var("NIBBLE_GEMM_PRIVATE_B", "1");
    common::switches::parallel_products_give_the_bits_of_one_thread();
}
