//! Where the time of a batch-1 forward on a team goes: 18 distinct 1024x1024 f32 layers (bias,
//! product, ReLU; BigNet's weights without its residual adds and LayerNorms) run on a
//! [`nibble::tensor::team`] as `bignet`'s batch-1 forward runs them (each member its blocks of
//! rows of a layer, then a barrier), each member timing its work and its wait at every
//! barrier.
//!
//! `team_anatomy [REPS=200] [dense|packed] [chain|fixed] [balanced|own]`, on the pool
//! `RAYON_NUM_THREADS` sets. `dense` multiplies by the row-major tensors, `packed` by
//! `PackedWeight`s; `chain` feeds each layer the previous one's output (whose lines other cores
//! wrote), `fixed` the same input to every layer; `balanced` hands out the rows with
//! `Member::claim_blocks` (as `bignet` does), `own` gives each member fixed blocks
//! (`Member::blocks`). Prints the forward's median (min / max) over `REPS` forwards and, per
//! layer (medians over forwards of the mean / max over members), each member's work and wait,
//! µs.

use nibble::tensor::team::{self, block_rows, Member, SharedRows};
use nibble::tensor::weight::BATCH1_ROW_ALIGN;
use nibble::tensor::{PackedWeight, Rng, Tensor, WeightMatrix};
use std::time::Instant;

const D: usize = 1024;
const LAYERS: usize = 18;

/// Per member and layer: µs of work and of waiting at the barrier after it.
type Times = Vec<LayerTimes>;
/// One member's (work, wait) per layer.
type LayerTimes = [(f64, f64); LAYERS];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
        .max(1);
    let layout = args.get(2).map_or("packed", |s| s.as_str());
    let chain = args.get(3).map_or("chain", |s| s.as_str()) == "chain";
    let balanced = args.get(4).map_or("balanced", |s| s.as_str()) == "balanced";
    let mut rng = Rng::new(7);
    let dense: Vec<Tensor> = (0..LAYERS)
        .map(|_| {
            let v: Vec<f32> = (0..D * D).map(|_| rng.uniform(-0.03, 0.03)).collect();
            Tensor::from_vec(&[D, D], v).unwrap()
        })
        .collect();
    let packed: Vec<PackedWeight> = if layout == "packed" {
        dense
            .iter()
            .map(|w| PackedWeight::pack(w).unwrap())
            .collect()
    } else {
        Vec::new()
    };
    let weights: Vec<&dyn WeightMatrix> = if layout == "packed" {
        packed.iter().map(|w| w as &dyn WeightMatrix).collect()
    } else {
        dense.iter().map(|w| w as &dyn WeightMatrix).collect()
    };
    let threads = rayon::current_num_threads();
    let x0: Vec<f32> = (0..D).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let (mut a, mut b) = (x0.clone(), vec![0.0f32; D]);
    let mut forwards = Vec::with_capacity(reps);
    let mut per_layer: Vec<Times> = Vec::with_capacity(reps);
    for rep in 0..reps + reps / 10 {
        let times = std::sync::Mutex::new(vec![[(0.0, 0.0); LAYERS]; threads]);
        a.copy_from_slice(&x0);
        let bufs = [SharedRows::new(&mut a), SharedRows::new(&mut b)];
        let t0 = Instant::now();
        let ran = team::run(|member: &Member<'_>| -> Result<(), team::Aborted> {
            let mut mine = [(0.0, 0.0); LAYERS];
            let block = block_rows(D, member.threads(), BATCH1_ROW_ALIGN);
            for (l, w) in weights.iter().enumerate() {
                let start = Instant::now();
                let (src, dst) = if chain {
                    (&bufs[l % 2], &bufs[(l + 1) % 2])
                } else {
                    (&bufs[0], &bufs[1])
                };
                // SAFETY: read after the barrier that ended the layer that wrote it.
                let x = unsafe { src.read() };
                let rows_of = w.batch1_rows(x).unwrap();
                let blocks: Box<dyn Iterator<Item = std::ops::Range<usize>>> = if balanced {
                    Box::new(member.claim_blocks(D, block))
                } else {
                    Box::new(member.blocks(D, block))
                };
                for rows in blocks {
                    // SAFETY: rows this member alone computes; the buffer was last read before
                    // the previous barrier.
                    let y = unsafe { dst.rows_mut(rows.clone()) };
                    y.fill(0.0);
                    rows_of.rows(rows, y, true).unwrap();
                    for v in y.iter_mut() {
                        *v = v.max(0.0);
                    }
                }
                let worked = Instant::now();
                member.wait()?;
                let waited = Instant::now();
                mine[l] = (
                    (worked - start).as_secs_f64() * 1e6,
                    (waited - worked).as_secs_f64() * 1e6,
                );
            }
            times.lock().unwrap()[member.index()] = mine;
            Ok(())
        });
        let elapsed = t0.elapsed().as_secs_f64() * 1e3;
        ran.expect("a team of two threads or more").unwrap();
        if rep >= reps / 10 {
            forwards.push(elapsed);
            per_layer.push(times.into_inner().unwrap());
        }
    }
    let mut sorted = forwards.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    println!(
        "team_anatomy {layout} {} {}: {threads} threads, forward {:.3} ms (min {:.3}, max {:.3})",
        if chain { "chain" } else { "fixed" },
        if balanced { "balanced" } else { "own" },
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    );
    let mut sums = [0.0f64; 4];
    for l in 0..LAYERS {
        let stat = |f: &dyn Fn(&LayerTimes) -> f64, max: bool| {
            median(
                per_layer
                    .iter()
                    .map(|members| {
                        let v = members.iter().map(f);
                        if max {
                            v.fold(0.0, f64::max)
                        } else {
                            v.sum::<f64>() / threads as f64
                        }
                    })
                    .collect(),
            )
        };
        let row = [
            stat(&|t| t[l].0, false),
            stat(&|t| t[l].0, true),
            stat(&|t| t[l].1, false),
            stat(&|t| t[l].1, true),
        ];
        for (s, r) in sums.iter_mut().zip(row) {
            *s += r;
        }
        if l < 3 || l + 1 == LAYERS {
            println!(
                "  layer {l:2}: work {:6.2} mean {:6.2} max   wait {:6.2} mean {:6.2} max",
                row[0], row[1], row[2], row[3]
            );
        }
    }
    println!(
        "  all layers: work {:7.1} mean {:7.1} max   wait {:7.1} mean {:7.1} max (µs, sums of the layers' medians)",
        sums[0], sums[1], sums[2], sums[3]
    );
}
