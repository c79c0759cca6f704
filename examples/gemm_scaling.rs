//! How far the parallel f32 GEMM is from what the cores can do side by side: one 1024-wide
//! layer's forward `x · Wᵀ` (batch `m`) by `gemm` on the rayon pool (`RAYON_NUM_THREADS`), by
//! `gemm` on one thread, and as `T` independent serial GEMMs run at once on `T` threads of
//! their own (each a one-thread rayon pool, started together at a barrier): the rows split in
//! `T` blocks (each thread packs all of B), or a `gr x gc` grid of row and column blocks (each
//! thread packs its rows of A and its columns of B, writing a private block of C). Rounds
//! interleave the cases so that machine noise hits them alike; median, min and max of `reps`.
//!
//! On the 16-core Xeon (2026-12-04, thirteenth session, medians of 15, ms): `gemm` on the
//! pool 1.92 / 2.01, one thread 13.6–19.7, 16 independent row blocks 3.21–3.32, grids 4x4 /
//! 2x8 / 8x2 2.50–2.60 / 2.55 / 2.55; on 8 threads the pool 3.03, independent 3.38–3.86. The
//! shared GEMM (one packed B, tasks balanced by the pool) is the faster way to use the cores;
//! the independent serial GEMMs lose to the cache and memory traffic of packing all of their
//! operands per thread. (`gemm` with one stage read 1.58–1.69 here, but in `gemm_tiles`'
//! interleaved rounds of the same run 1.65 against 1.69, and 1.98 against 1.90 in another
//! lease: within the noise, as in earlier sessions.)
//!
//! `cargo run --release --example gemm_scaling -- 1024 15 4x4,2x8,8x2`

#[path = "common/timing.rs"]
mod timing;

use nibble::tensor::gemm::{gemm, gemm_with_stage, MatRef};
use nibble::tensor::{Rng, Tensor};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

/// A block of C computed by one thread: rows `i0..i1`, columns `j0..j1`.
#[derive(Clone, Copy)]
struct Block {
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let reps: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .max(1);
    let grids: Vec<(usize, usize)> = args
        .get(3)
        .map_or("4x4,2x8,8x2", |s| s.as_str())
        .split(',')
        .filter_map(|g| {
            let (r, c) = g.split_once('x')?;
            Some((r.trim().parse().ok()?, c.trim().parse().ok()?))
        })
        .collect();
    let threads = rayon::current_num_threads();
    let d = 1024;
    let mut rng = Rng::new(0);
    let w = Tensor::uniform(&[d, d], -0.03, 0.03, &mut rng);
    let x = Tensor::randn(&[m, d], &mut rng);
    let (w, x) = (Arc::new(w), Arc::new(x));

    // Layouts of independent blocks: the rows in `threads` blocks (a `threads x 1` grid),
    // then each grid asked for.
    let mut layouts: Vec<(String, Vec<Block>)> = Vec::new();
    for (gr, gc) in std::iter::once((threads, 1)).chain(grids) {
        if gr * gc != threads {
            println!("skip grid {gr}x{gc}: not {threads} threads");
            continue;
        }
        let blocks = (0..gr * gc)
            .map(|t| Block {
                i0: m * (t / gc) / gr,
                i1: m * (t / gc + 1) / gr,
                j0: d * (t % gc) / gc,
                j1: d * (t % gc + 1) / gc,
            })
            .collect();
        layouts.push((format!("independent grid {gr}x{gc}"), blocks));
    }

    // One worker per thread, each with a one-thread pool; a round runs layout `l` on every
    // worker between two barriers.
    let start = Arc::new(Barrier::new(threads + 1));
    let done = Arc::new(Barrier::new(threads + 1));
    let job: Arc<Mutex<Option<usize>>> = Arc::new(Mutex::new(None));
    let layouts = Arc::new(layouts);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (start, done, job, layouts) =
                (start.clone(), done.clone(), job.clone(), layouts.clone());
            let (w, x) = (w.clone(), x.clone());
            std::thread::spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool");
                let mut c = vec![0.0f32; m * d];
                loop {
                    start.wait();
                    let Some(l) = *job.lock().expect("job") else {
                        return;
                    };
                    let b = layouts[l].1[t];
                    let (rows, cols) = (b.i1 - b.i0, b.j1 - b.j0);
                    let a = MatRef::row_major(&x.data()[b.i0 * d..b.i1 * d], rows, d).expect("x");
                    let bt = MatRef::row_major(&w.data()[b.j0 * d..b.j1 * d], cols, d)
                        .expect("w")
                        .t();
                    pool.install(|| gemm(a, &bt, &mut c[..rows * cols], false))
                        .expect("shapes match");
                    done.wait();
                }
            })
        })
        .collect();

    let a = MatRef::row_major(x.data(), m, d).expect("x");
    let bt = MatRef::row_major(w.data(), d, d).expect("w").t();
    let mut y = vec![0.0f32; m * d];
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    let mut names = vec![
        format!("gemm, pool of {threads}"),
        format!("gemm one stage, pool of {threads}"),
        "gemm, one thread".to_string(),
    ];
    names.extend(layouts.iter().map(|(n, _)| n.clone()));
    let mut times = vec![Vec::new(); names.len()];
    for round in 0..=reps {
        for (c, t) in times.iter_mut().enumerate() {
            let s = Instant::now();
            match c {
                0 => gemm(a, &bt, &mut y, false).expect("shapes match"),
                1 => gemm_with_stage(d * d, a, &bt, &mut y, false).expect("shapes match"),
                2 => one
                    .install(|| gemm(a, &bt, &mut y, false))
                    .expect("shapes match"),
                l => {
                    *job.lock().expect("job") = Some(l - 3);
                    start.wait();
                    done.wait();
                }
            }
            if round > 0 {
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    *job.lock().expect("job") = None;
    start.wait();
    for h in workers {
        h.join().expect("worker");
    }
    println!("{threads} threads, batch {m}, x·Wᵀ 1024 wide");
    let flop = 2.0 * (m * d * d) as f64;
    for (name, t) in names.into_iter().zip(times) {
        timing::report(&name, 36, flop, t);
    }
}
