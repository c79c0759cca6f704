//! Arguments a caller should not pass, through the public API: each is an error naming the
//! op, never a panic, an abort or a silent wrong answer (found by an audit of the API as a
//! downstream crate uses it).

use nibble_tensor::{
    group_norm, group_norm_backward, linear, linear_backward_input, HalfTensor, Tensor,
    TensorError, WeightMatrix,
};

/// A weight that is no matrix (a 1-D or 0-D tensor, f32 or f16) is a rank error from the
/// products, and its feature counts are 0 (they indexed its shape: "index out of bounds").
#[test]
fn a_weight_of_another_rank_is_an_error() {
    let x = Tensor::from_vec(&[1, 3], vec![1.0, 2.0, 3.0]).unwrap();
    let dy = Tensor::from_vec(&[1, 3], vec![1.0, 2.0, 3.0]).unwrap();
    let f32_weights = [
        Tensor::zeros(&[3]),
        Tensor::scalar(1.0),
        Tensor::zeros(&[1, 3, 3]),
    ];
    for w in &f32_weights {
        assert_eq!(
            (w.out_features(), w.in_features()),
            (0, 0),
            "{:?}",
            w.shape()
        );
        let err = linear(&x, w, None).unwrap_err();
        assert!(matches!(err, TensorError::Rank { .. }), "{err}");
        assert!(linear_backward_input(&dy, w).is_err());
        let mut y = [f32::NAN; 3];
        assert!(w.matmul_t(x.data(), 1, &mut y, false).is_err());
    }
    let h = HalfTensor::from_fn(&[3], |_| nibble_tensor::f16::ONE).unwrap();
    assert_eq!((h.out_features(), h.in_features()), (0, 0));
    assert!(matches!(
        linear(&x, &h, None).unwrap_err(),
        TensorError::Rank { .. }
    ));
}

/// Shapes whose bytes overflow, or that no allocator can give (4 EiB: beyond any address
/// space), are errors from the constructors meant for untrusted shapes ("capacity overflow"
/// panics, or an abort on the failed allocation).
#[test]
fn shapes_beyond_memory_are_errors() {
    for shape in [[1usize << 62, 1], [1 << 60, 1], [1 << 31, 1 << 30]] {
        assert!(Tensor::try_zeros(&shape).is_err(), "try_zeros {shape:?}");
        assert!(
            Tensor::from_fn(&shape, |_| 0.0).is_err(),
            "from_fn {shape:?}"
        );
    }
    let err = Tensor::try_zeros(&[1 << 60]).unwrap_err();
    assert!(err.to_string().contains("cannot allocate"), "{err}");
    assert!(HalfTensor::from_fn(&[1 << 63], |_| nibble_tensor::f16::ZERO).is_err());
    assert!(HalfTensor::from_fn(&[1 << 61], |_| nibble_tensor::f16::ZERO).is_err());
    assert!(Tensor::repeat_row(&[1.0], usize::MAX / 2).is_err());
    assert!(Tensor::repeat_row(&[1.0, 2.0], 1 << 60).is_err());
    // Still fine at ordinary sizes.
    assert_eq!(Tensor::try_zeros(&[3, 2]).unwrap().data(), &[0.0; 6]);
    assert_eq!(
        Tensor::repeat_row(&[1.0, 2.0], 2).unwrap().data(),
        &[1.0, 2.0, 1.0, 2.0]
    );
}

/// An empty input `[m, 0]` takes any count of groups (0 channels divide into any), so the
/// statistics' length `m · groups` is checked: an overflow is an error (it wrapped to 0 and
/// returned empty statistics, or panicked on the allocation), and an epsilon that is not
/// finite and non-negative is an error on an empty input too (the early return skipped it).
#[test]
fn group_norm_checks_its_statistics_and_epsilon_on_empty_inputs() {
    let x = Tensor::zeros(&[2, 0]);
    for groups in [1usize << 63, 1 << 62, usize::MAX] {
        assert!(group_norm(&x, groups, &[], &[], 1e-5).is_err(), "{groups}");
    }
    let (y, stats) = group_norm(&x, 3, &[], &[], 1e-5).unwrap();
    assert_eq!((y.shape(), stats.mean.len()), (&[2usize, 0][..], 6));
    assert!(group_norm_backward(&x, &x, 1 << 63, &[], &stats).is_err());
    let empty = Tensor::zeros(&[0, 4]);
    for eps in [f32::NAN, -1.0, f32::INFINITY] {
        assert!(
            group_norm(&empty, 2, &[1.0; 4], &[0.0; 4], eps).is_err(),
            "eps {eps}"
        );
    }
}
