//! The kernel-path dispatch: tiers nest, fall back to what the CPU has, and name themselves as
//! `NIBBLE_KERNEL` spells them.

use nibble_tensor::cpu::{
    available_paths, detected_path, has_avx2_fma_f16c, has_avx512, kernel_path, missing_paths,
    KernelPath,
};

const ALL: [KernelPath; 4] = [
    KernelPath::Avx512,
    KernelPath::Avx2Fma,
    KernelPath::Portable,
    KernelPath::Scalar,
];

#[test]
fn supported_falls_back_to_what_the_cpu_has() {
    let want512 = if has_avx512() {
        KernelPath::Avx512
    } else if has_avx2_fma_f16c() {
        KernelPath::Avx2Fma
    } else {
        KernelPath::Portable
    };
    assert_eq!(KernelPath::Avx512.supported(), want512);
    assert_eq!(detected_path(), want512);
    assert!(
        !has_avx512() || has_avx2_fma_f16c(),
        "AVX-512 tier implies AVX2"
    );
    for p in ALL {
        let s = p.supported();
        assert_eq!(s.supported(), s, "{p:?}");
        assert_ne!(p.at_most_avx2(), KernelPath::Avx512, "{p:?}");
        assert_eq!(available_paths().contains(&p), s == p, "{p:?}");
        assert_eq!(missing_paths().contains(&p.name()), s != p, "{p:?}");
    }
    assert_eq!(KernelPath::Scalar.supported(), KernelPath::Scalar);
    assert_eq!(KernelPath::Portable.supported(), KernelPath::Portable);
    assert_eq!(kernel_path().supported(), kernel_path());
    eprintln!(
        "kernel tiers here: {:?}, lacking {:?}",
        available_paths(),
        missing_paths()
    );
}

#[test]
fn names_are_the_nibble_kernel_values() {
    let names: Vec<&str> = ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["avx512", "avx2", "portable", "scalar"]);
}
