//! A LoRA layer on int8 activations through the integer GEMM (`act8::adapter::forward_adapter`,
//! which `WeightMatrix::matmul_t_low_rank` runs there): the bits of `h` from `act8::forward` of
//! the adapter's int8 codes (`AdapterCodes`) followed by `linear_low_rank_into` under int8
//! activations; the same on every integer tier (emulated ones included) and thread count;
//! within the documented bound of the f32 adapter's output; and declined, with y untouched,
//! where it does not apply.

mod common;

use nibble_quant::act8::adapter::{forward_adapter, AdapterCodes};
use nibble_quant::act8::{forward, with_activations, ActivationMode, IntCodes, IntTier, GROUP};
use nibble_quant::cpu::kernel_path;
use nibble_quant::{Int8Matrix, KernelPath, LowerMatrix, Nf4Matrix, Q4Matrix};
use nibble_tensor::lowrank::LowRank;
use nibble_tensor::ops::PostOp;
use nibble_tensor::{linear_low_rank_into, Rng, Tensor, WeightMatrix};

/// Every format of one matrix: its name, the layer's view and the integer view.
type Format = (&'static str, Box<dyn WeightMatrix>, Box<dyn IntCodes>);

/// Those with an integer layout (NF4 has none where `in % 64 != 0`).
fn formats(o: usize, i: usize, seed: u64) -> Vec<Format> {
    let w = Tensor::randn(&[o, i], &mut Rng::new(seed)).scale(1.0 / (i as f32).sqrt());
    fn one<M: WeightMatrix + IntCodes + 'static>(
        name: &'static str,
        m: impl Fn() -> M,
    ) -> Option<Format> {
        let layer = m();
        layer.int_layout()?;
        Some((name, Box::new(layer), Box::new(m())))
    }
    [
        one("q4", || Q4Matrix::quantize(&w).unwrap()),
        one("nf4", || Nf4Matrix::quantize(&w).unwrap()),
        one("nf4_dq", || Nf4Matrix::quantize_double(&w).unwrap()),
        one("int8", || Int8Matrix::quantize(&w).unwrap()),
        one("lower", || LowerMatrix::quantize(&w).unwrap()),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// `max |v|` of each group of 128 of each row (`[rows, cols]`), over 254: half a step of
/// the int8 quantization of that group.
fn half_steps(v: &[f32], cols: usize) -> Vec<f32> {
    v.chunks(cols)
        .flat_map(|row| {
            let mut e = vec![0.0f32; cols];
            for (g, grp) in row.chunks(128).enumerate() {
                let amax = grp.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                e[g * 128..g * 128 + grp.len()].fill(amax / 254.0);
            }
            e
        })
        .collect()
}

#[test]
fn int8_adapter_gives_the_bits_of_its_parts_on_every_tier_and_thread_count() {
    let mut tiers = common::int_tiers(
        "adapter_int8",
        &[IntTier::AmxEmulated, IntTier::AvxVnniEmulated],
    );
    tiers.push(IntTier::Scalar);
    let here = IntTier::for_path(kernel_path());
    let simd = matches!(kernel_path(), KernelPath::Avx2Fma | KernelPath::Avx512);
    if !simd {
        println!("adapter_int8: the f32 tail needs AVX2 or AVX-512: only the declines are checked");
    }
    let pools = common::pools();
    let mut ran = 0;
    // (1023, 256, 32) is BigNet's rank on a ragged width; 65 goes past one panel of h; 1 and
    // 7 are short; 1023 inputs leave a ragged last group of x and of A.
    for (o, i, rank) in [
        (1023, 256, 32),
        (200, 1024, 65),
        (129, 33, 1),
        (64, 130, 7),
        (17, 1023, 17),
    ] {
        let mut rng = Rng::new((o * 7 + i + rank) as u64);
        let a = Tensor::randn(&[rank, i], &mut rng).scale(0.1);
        let b = Tensor::randn(&[o, rank], &mut rng).scale(0.1);
        let bias: Vec<f32> = (0..o).map(|_| rng.normal()).collect();
        let adapter = LowRank::new(&a, &b).unwrap();
        for (name, w, wi) in formats(o, i, 3) {
            // A's codes in units of a whole group, as the layer runs them.
            let codes = AdapterCodes::new(a.data(), rank, i, GROUP).unwrap();
            for m in [17, 33, 64, 129] {
                let mut x = Tensor::randn(&[m, i], &mut rng);
                x.data_mut()[i..2 * i].fill(0.0); // an all-zero vector
                for (with_bias, post) in [(true, PostOp::Relu), (false, PostOp::Identity)] {
                    let bias = with_bias.then_some(&bias[..]);
                    let what = format!("{name} {o}x{i} rank {rank}, batch {m}, bias {with_bias}");
                    // The parts: h on the int8 x, then the layer as the training forward runs it.
                    let (want, want_f32h) = with_activations(ActivationMode::Int8, || {
                        let mut h = vec![f32::NAN; m * rank];
                        assert!(forward(here, &codes, x.data(), m, &mut h, false), "{what}");
                        let mut y = vec![f32::NAN; m * o];
                        linear_low_rank_into(&*w, x.data(), m, &mut y, bias, (&h, &b), post)
                            .unwrap();
                        let mut hf = vec![0.0f32; m * rank];
                        a.matmul_t(x.data(), m, &mut hf, false).unwrap();
                        let mut yf = vec![f32::NAN; m * o];
                        linear_low_rank_into(&*w, x.data(), m, &mut yf, bias, (&hf, &b), post)
                            .unwrap();
                        (y, yf)
                    });
                    // Every tier, through the driver itself, on 1, 2, 3 and 16 threads.
                    let mut first: Option<Vec<u32>> = None;
                    for &tier in &tiers {
                        for pool in &pools {
                            let mut y = vec![f32::NAN; m * o];
                            let done = pool.install(|| {
                                forward_adapter(
                                    tier,
                                    &*wi,
                                    x.data(),
                                    m,
                                    &mut y,
                                    bias,
                                    &adapter,
                                    post,
                                )
                            });
                            let t = pool.current_num_threads();
                            assert_eq!(done, simd, "{what}, {tier:?}, {t} threads");
                            if !done {
                                assert!(y.iter().all(|v| v.is_nan()), "{what}: y touched");
                                continue;
                            }
                            match &first {
                                None => first = Some(bits(&y)),
                                Some(f) => assert!(*f == bits(&y), "{what}, {tier:?}, {t} threads"),
                            }
                        }
                    }
                    // The layer's own call: where int8 mode routes the format's batch to the
                    // integer GEMM it runs the driver (the parts' bits), else it declines.
                    let mut y = vec![f32::NAN; m * o];
                    let fused = with_activations(ActivationMode::Int8, || {
                        w.matmul_t_low_rank(x.data(), m, &mut y, bias, &adapter, post)
                            .unwrap()
                    });
                    if !fused {
                        assert!(y.iter().all(|v| v.is_nan()), "{what}: y touched");
                        continue;
                    }
                    ran += 1;
                    assert!(bits(&y) == bits(&want), "{what}: not the parts' bits");
                    assert!(
                        first.as_ref() == Some(&bits(&y)),
                        "{what}: not the driver's bits"
                    );
                    // Against the f32 adapter: within Σ_j |b_oj| · |Δh_j|'s bound.
                    let (ex, ea) = (half_steps(x.data(), i), half_steps(a.data(), i));
                    let dh: Vec<f32> = (0..m * rank)
                        .map(|t| {
                            let (r, j) = (t / rank, t % rank);
                            (0..i)
                                .map(|k| {
                                    let (xv, av) = (x.data()[r * i + k], a.data()[j * i + k]);
                                    let (e1, e2) = (ex[r * i + k], ea[j * i + k]);
                                    av.abs() * e1 + xv.abs() * e2 + e1 * e2 + 1e-6 * (av * xv).abs()
                                })
                                .sum::<f32>()
                        })
                        .collect();
                    for (t, (&g, &f)) in y.iter().zip(&want_f32h).enumerate() {
                        let (r, c) = (t / o, t % o);
                        let bound: f32 = (0..rank)
                            .map(|j| b.data()[c * rank + j].abs() * dh[r * rank + j])
                            .sum::<f32>()
                            + 1e-5 * f.abs()
                            + 1e-6;
                        assert!((g - f).abs() <= bound, "{what}: {g} vs {f} (bound {bound})");
                    }
                }
            }
        }
    }
    if simd {
        assert!(ran > 0, "no batch took the int8 adapter");
    }
}

#[test]
fn int8_adapter_declines_what_it_does_not_run() {
    let (o, i, rank) = (64, 128, 8);
    let mut rng = Rng::new(5);
    let w = Q4Matrix::quantize(&Tensor::randn(&[o, i], &mut rng)).unwrap();
    let a = Tensor::randn(&[rank, i], &mut rng);
    let b = Tensor::randn(&[o, rank], &mut rng);
    let adapter = LowRank::new(&a, &b).unwrap();
    let tier = IntTier::for_path(kernel_path());
    let run = |x: &[f32], m: usize, adapter: &LowRank<'_>| {
        let mut y = vec![f32::NAN; m * o];
        let done = forward_adapter(tier, &w, x, m, &mut y, None, adapter, PostOp::Identity);
        assert!(
            done || y.iter().all(|v| v.is_nan()),
            "declined with y touched"
        );
        done
    };
    // Below the GEMM's batches (and where B's product would run as GEMVs).
    let x = Tensor::randn(&[4, i], &mut rng);
    assert!(!run(x.data(), 4, &adapter));
    // A NaN or an infinity in x or A.
    let mut x = Tensor::randn(&[33, i], &mut rng);
    x.data_mut()[5 * i + 3] = f32::INFINITY;
    assert!(!run(x.data(), 33, &adapter));
    let x = Tensor::randn(&[33, i], &mut rng);
    let mut bad = a.clone();
    bad.data_mut()[7] = f32::NAN;
    assert!(!run(x.data(), 33, &LowRank::new(&bad, &b).unwrap()));
    // A layer of another shape.
    let wide = Tensor::randn(&[rank, i + 1], &mut rng);
    let b2 = Tensor::randn(&[o, rank], &mut rng);
    assert!(!run(x.data(), 33, &LowRank::new(&wide, &b2).unwrap()));
    // The codes' own checks.
    assert!(AdapterCodes::new(a.data(), rank, i, 32).is_none());
    assert!(AdapterCodes::new(&a.data()[1..], rank, i, 16).is_none());
    assert!(AdapterCodes::new(a.data(), rank, i, 16).is_some());
}
