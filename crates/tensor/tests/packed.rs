//! `PackedWeight`: the GEMM's bits at every batch (panel GEMV and GEMM in place), the input
//! gradient, batch-1 row ranges, the fused layer, thread counts and errors, on awkward shapes.

mod common;
use common::{bits, in_pool};

use nibble_tensor::gemm::{gemm, MatRef};
use nibble_tensor::ops::PostOp;
use nibble_tensor::{PackedWeight, Rng, Tensor, WeightMatrix};

const SHAPES: [(usize, usize); 10] = [
    (1, 1),
    (7, 15),
    (17, 33),
    (16, 256),
    (33, 63),
    (40, 300),
    (63, 257),
    (129, 17),
    (31, 1023),
    (1023, 129),
];
const BATCHES: [usize; 9] = [0, 1, 2, 7, 16, 17, 33, 63, 129];

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::uniform(shape, -1.0, 1.0, rng)
}

#[test]
fn forward_gives_the_gemm_bits_at_every_batch_and_thread_count() {
    let mut rng = Rng::new(1);
    for (out, inn) in SHAPES {
        let w = random(&[out, inn], &mut rng);
        let p = PackedWeight::pack(&w).unwrap();
        let wt = MatRef::row_major(w.data(), out, inn).unwrap().t();
        for m in BATCHES {
            let x = random(&[m, inn], &mut rng);
            let start = random(&[m, out], &mut rng);
            for accumulate in [false, true] {
                let mut want = if accumulate {
                    start.data().to_vec()
                } else {
                    vec![f32::NAN; m * out]
                };
                gemm(
                    MatRef::row_major(x.data(), m, inn).unwrap(),
                    &wt,
                    &mut want,
                    accumulate,
                )
                .unwrap();
                for threads in [1, 2, 3, 16] {
                    let mut got = if accumulate {
                        start.data().to_vec()
                    } else {
                        vec![f32::NAN; m * out]
                    };
                    in_pool(threads, || p.matmul_t(x.data(), m, &mut got, accumulate)).unwrap();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{out}x{inn} batch {m} accumulate {accumulate} threads {threads}"
                    );
                }
                if m > 16 {
                    // Above the GEMV's batches, the unpacked tensor's own bits too.
                    let mut dense = if accumulate {
                        start.data().to_vec()
                    } else {
                        vec![f32::NAN; m * out]
                    };
                    w.matmul_t(x.data(), m, &mut dense, accumulate).unwrap();
                    assert_eq!(bits(&dense), bits(&want), "{out}x{inn} batch {m}");
                }
            }
        }
    }
}

#[test]
fn unpacks_to_the_tensor_it_was_packed_from() {
    let mut rng = Rng::new(2);
    for (out, inn) in SHAPES.into_iter().chain([(0, 5), (5, 0)]) {
        let w = random(&[out, inn], &mut rng);
        let p = PackedWeight::pack(&w).unwrap();
        assert_eq!(p.to_f32(), w, "{out}x{inn}");
        assert_eq!((p.out_features(), p.in_features()), (out, inn));
        assert_eq!(p.storage_bytes(), out.div_ceil(16) * 16 * inn * 4);
        assert_eq!(p.format_name(), "f32");
    }
}

#[test]
fn input_gradient_gives_the_tensor_bits() {
    let mut rng = Rng::new(3);
    for (out, inn) in SHAPES {
        let w = random(&[out, inn], &mut rng);
        let p = PackedWeight::pack(&w).unwrap();
        for m in [1, 7, 33, 129] {
            let dy = random(&[m, out], &mut rng);
            for accumulate in [false, true] {
                let start = random(&[m, inn], &mut rng);
                let init = |a: bool| {
                    if a {
                        start.data().to_vec()
                    } else {
                        vec![f32::NAN; m * inn]
                    }
                };
                let (mut want, mut got) = (init(accumulate), init(accumulate));
                w.matmul(dy.data(), m, &mut want, accumulate).unwrap();
                in_pool(3, || p.matmul(dy.data(), m, &mut got, accumulate)).unwrap();
                assert_eq!(bits(&got), bits(&want), "{out}x{inn} batch {m}");
            }
        }
    }
}

#[test]
fn batch1_rows_give_the_batch1_bits_for_any_aligned_range() {
    let mut rng = Rng::new(4);
    for (out, inn) in SHAPES {
        let w = random(&[out, inn], &mut rng);
        let p = PackedWeight::pack(&w).unwrap();
        let x = random(&[inn], &mut rng);
        let start = random(&[out], &mut rng);
        let rows = p
            .batch1_rows(x.data())
            .expect("packed weights run batch-1 rows");
        for accumulate in [false, true] {
            let mut full = if accumulate {
                start.data().to_vec()
            } else {
                vec![f32::NAN; out]
            };
            p.matmul_t(x.data(), 1, &mut full, accumulate).unwrap();
            let mut ranges = Vec::new();
            ranges.push(0..out);
            if out % 4 == 0 {
                ranges.push(out..out);
            }
            for s in (0..out).step_by(4) {
                ranges.push(s..(s + 13).min(out));
                ranges.push(s..out);
            }
            for r in ranges {
                let mut y = if accumulate {
                    start.data()[r.clone()].to_vec()
                } else {
                    vec![f32::NAN; r.len()]
                };
                rows.rows(r.clone(), &mut y, accumulate).unwrap();
                assert_eq!(bits(&y), bits(&full[r.clone()]), "{out}x{inn} rows {r:?}");
            }
        }
        // Ranges that do not fit are errors, with y untouched.
        let mut y = vec![7.0f32; 3];
        assert!(rows.rows(1..4, &mut y, false).is_err());
        assert!(rows.rows(out..out + 3, &mut y, false).is_err());
        assert!(rows.rows(0..out.min(2), &mut y, false).is_err());
        assert_eq!(y, vec![7.0; 3]);
    }
    let w = random(&[8, 4], &mut rng);
    assert!(PackedWeight::pack(&w)
        .unwrap()
        .batch1_rows(&[1.0; 3])
        .is_none());
}

#[test]
fn fused_layer_gives_the_tensor_bits() {
    let mut rng = Rng::new(5);
    for (out, inn) in SHAPES {
        let w = random(&[out, inn], &mut rng);
        let p = PackedWeight::pack(&w).unwrap();
        let bias_values = random(&[out], &mut rng);
        let bias = MatRef::row_major(bias_values.data(), 1, out).unwrap();
        for m in [1, 17, 129] {
            let x = random(&[m, inn], &mut rng);
            for post in [PostOp::Identity, PostOp::Relu] {
                let mut want = vec![f32::NAN; m * out];
                let mut got = vec![f32::NAN; m * out];
                if m > 16 {
                    w.matmul_t_fused(x.data(), m, &mut want, Some(&bias), None, post)
                        .unwrap();
                } else {
                    // Small batches: the parts in order on the packed weight itself.
                    for r in want.chunks_exact_mut(out) {
                        r.copy_from_slice(bias_values.data());
                    }
                    p.matmul_t(x.data(), m, &mut want, true).unwrap();
                    post.apply_in_place(&mut want);
                }
                p.matmul_t_fused(x.data(), m, &mut got, Some(&bias), None, post)
                    .unwrap();
                assert_eq!(bits(&got), bits(&want), "{out}x{inn} batch {m} {post:?}");
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    assert!(PackedWeight::from_rows(&[1.0; 5], 2, 3).is_err());
    assert!(PackedWeight::pack(&Tensor::zeros(&[2, 3, 4])).is_err());
    let p = PackedWeight::pack(&Tensor::zeros(&[4, 3])).unwrap();
    let mut y = vec![0.0f32; 4];
    assert!(p.matmul_t(&[1.0; 2], 1, &mut y, false).is_err());
    assert!(p.matmul_t(&[1.0; 3], 1, &mut y[..3], false).is_err());
    assert!(p.matmul(&[1.0; 4], 1, &mut y[..2], false).is_err());
    let mut dx = vec![0.0f32; 3];
    p.matmul(&[1.0; 4], 1, &mut dx, false).unwrap();
    assert_eq!(dx, vec![0.0; 3]);
}

/// A `Wᵀ` operand that offers a packed block too short to hold its panels: the GEMM must not
/// read it and pack the block itself instead.
struct ShortBlocks<'a>(MatRef<'a, f32>, Vec<f32>);

impl nibble_tensor::gemm::PackB for ShortBlocks<'_> {
    fn k(&self) -> usize {
        self.0.k()
    }
    fn n(&self) -> usize {
        self.0.n()
    }
    fn pack_panel(&self, k0: usize, kc: usize, n0: usize, nc: usize, dst: &mut [f32]) {
        self.0.pack_panel(k0, kc, n0, nc, dst)
    }
    fn prepacked_block(&self, k0: usize) -> Option<&[f32]> {
        let needed = self.n().div_ceil(16) * (self.k() - k0).min(256) * 16;
        Some(&self.1[..needed - 1])
    }
}

#[test]
fn held_blocks_too_short_are_packed_instead_and_mix_with_packed_segments() {
    use nibble_tensor::gemm::{gemm_segments_post, PackB, Segment};
    let mut rng = Rng::new(6);
    for (out, inn) in SHAPES {
        let w = random(&[out, inn], &mut rng);
        let wt = MatRef::row_major(w.data(), out, inn).unwrap().t();
        let short = ShortBlocks(wt, vec![f32::NAN; out.div_ceil(16) * 16 * inn.min(256)]);
        let p = PackedWeight::pack(&w).unwrap();
        let m = 37;
        let x = random(&[m, inn], &mut rng);
        let xa = MatRef::row_major(x.data(), m, inn).unwrap();
        let h = random(&[m, 5], &mut rng);
        let bt = random(&[5, out], &mut rng);
        let extra = Segment {
            a: MatRef::row_major(h.data(), m, 5).unwrap(),
            b: &MatRef::row_major(bt.data(), 5, out).unwrap(),
        };
        let run = |b: &dyn PackB| {
            let mut y = vec![f32::NAN; m * out];
            let segs = [Segment { a: xa, b }, extra];
            gemm_segments_post(&segs, &mut y, false, PostOp::Relu).unwrap();
            y
        };
        let want = run(&wt);
        assert_eq!(bits(&run(&short)), bits(&want), "{out}x{inn} short blocks");
        assert_eq!(bits(&run(&p)), bits(&want), "{out}x{inn} packed weight");
    }
}
