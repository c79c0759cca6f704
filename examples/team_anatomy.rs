//! Where the time of a batch-1 forward on a team goes: 18 distinct 1024x1024 f32 layers (bias,
//! product, ReLU; BigNet's weights without its residual adds and LayerNorms) run on a
//! [`nibble::tensor::team`] as `bignet`'s batch-1 forward runs them (each member its blocks of rows
//! of a layer, then a barrier), each member timing its work and its wait at every barrier.
//!
//! `team_anatomy [REPS=200] [dense|packed|q4|int8|nf4] [chain|fixed] [balanced|own] [plain|lora]`,
//! on the pool `RAYON_NUM_THREADS` sets. `dense` multiplies by the row-major tensors, `packed` by
//! `PackedWeight`s, `q4` by `Q4Matrix`es (low_precision's format), `int8` by `Int8Matrix`es and
//! `nf4` by `Nf4Matrix`es (with `NIBBLE_ACTIVATIONS=int8`, their fused int8 GEMVs); `chain` feeds
//! each layer the previous one's output (whose lines other cores wrote), `fixed` the same input to
//! every layer; `balanced` hands out the rows with `Member::claim_blocks` (as `bignet` does), `own`
//! gives each member fixed blocks (`Member::blocks`); `lora` adds a rank-32 f32 adapter to every
//! layer, run as `bignet`'s team runs it (members' rows of `h = A x`, an arrival, the base rows, a
//! wait for all of `h`, then `B h` on the rows the member computed). Prints the forward's median
//! (min / max) over `REPS` forwards and, per layer (medians over forwards of the mean / max over
//! members), each member's work, its wait for `h` (lora) and its wait at the barrier ending the
//! layer, µs.

use nibble::quant::{Int8Matrix, Nf4Matrix, Q4Matrix};
use nibble::tensor::team::{self, block_rows, Member, SharedRows};
use nibble::tensor::weight::BATCH1_ROW_ALIGN;
use nibble::tensor::{PackedWeight, Rng, Tensor, WeightMatrix};
use std::time::Instant;

const D: usize = 1024;
const LAYERS: usize = 18;

/// Per member and layer: µs of work, of waiting for `h`, and of waiting at the barrier after it.
type Times = Vec<LayerTimes>;
/// One member's (work, wait for h, wait) per layer.
type LayerTimes = [(f64, f64, f64); LAYERS];

/// The rank of the `lora` adapters.
const RANK: usize = 32;

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
    let lora = args.get(5).map_or("plain", |s| s.as_str()) == "lora";
    let mut rng = Rng::new(7);
    let dense: Vec<Tensor> = (0..LAYERS)
        .map(|_| {
            let v: Vec<f32> = (0..D * D).map(|_| rng.uniform(-0.03, 0.03)).collect();
            Tensor::from_vec(&[D, D], v).unwrap()
        })
        .collect();
    // The layers in the chosen layout (none for `dense`, which multiplies by the tensors).
    fn each<T: WeightMatrix + 'static>(
        dense: &[Tensor],
        build: impl Fn(&Tensor) -> T,
    ) -> Vec<Box<dyn WeightMatrix>> {
        dense
            .iter()
            .map(|w| Box::new(build(w)) as Box<dyn WeightMatrix>)
            .collect()
    }
    let built = match layout {
        "packed" => each(&dense, |w| PackedWeight::pack(w).unwrap()),
        "q4" => each(&dense, |w| Q4Matrix::quantize(w).unwrap()),
        "int8" => each(&dense, |w| Int8Matrix::quantize(w).unwrap()),
        "nf4" => each(&dense, |w| Nf4Matrix::quantize(w).unwrap()),
        _ => Vec::new(),
    };
    let weights: Vec<&dyn WeightMatrix> = if built.is_empty() {
        dense.iter().map(|w| w as &dyn WeightMatrix).collect()
    } else {
        built.iter().map(|w| &**w).collect()
    };
    let mut factor = |rows, cols| {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(-0.03, 0.03)).collect();
        Tensor::from_vec(&[rows, cols], v).unwrap()
    };
    let adapters: Vec<(Tensor, Tensor)> = (0..LAYERS)
        .map(|_| (factor(RANK, D), factor(D, RANK)))
        .collect();
    let threads = rayon::current_num_threads();
    let x0: Vec<f32> = (0..D).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let (mut a, mut b, mut h) = (x0.clone(), vec![0.0f32; D], vec![0.0f32; RANK]);
    let mut forwards = Vec::with_capacity(reps);
    let mut per_layer: Vec<Times> = Vec::with_capacity(reps);
    for rep in 0..reps + reps / 10 {
        let times = std::sync::Mutex::new(vec![[(0.0, 0.0, 0.0); LAYERS]; threads]);
        a.copy_from_slice(&x0);
        let bufs = [SharedRows::new(&mut a), SharedRows::new(&mut b)];
        let hbuf = SharedRows::new(&mut h);
        let t0 = Instant::now();
        let ran = team::run(|member: &Member<'_>| -> Result<(), team::Aborted> {
            let mut mine = [(0.0, 0.0, 0.0); LAYERS];
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
                let arrival = if lora {
                    let a_rows = adapters[l].0.batch1_rows(x).unwrap();
                    for rows in member.blocks(RANK, BATCH1_ROW_ALIGN) {
                        // SAFETY: this member's rows of h, read by all only after the arrival
                        // below; last read before the previous barrier.
                        a_rows
                            .rows(rows.clone(), unsafe { hbuf.rows_mut(rows) }, false)
                            .unwrap();
                    }
                    Some(member.arrive()?)
                } else {
                    None
                };
                let rows_of = w.batch1_rows(x).unwrap();
                let blocks: Box<dyn Iterator<Item = std::ops::Range<usize>>> = if balanced {
                    Box::new(member.claim_blocks(D, block))
                } else {
                    Box::new(member.blocks(D, block))
                };
                let mut computed = Vec::new();
                for rows in blocks {
                    // SAFETY: rows this member alone computes; the buffer was last read before
                    // the previous barrier.
                    let y = unsafe { dst.rows_mut(rows.clone()) };
                    y.fill(0.0);
                    rows_of.rows(rows.clone(), y, true).unwrap();
                    if lora {
                        computed.push(rows);
                    } else {
                        for v in y.iter_mut() {
                            *v = v.max(0.0);
                        }
                    }
                }
                let mut h_wait = 0.0;
                if let Some(arrival) = arrival {
                    let before = Instant::now();
                    member.wait_for(arrival)?;
                    h_wait = before.elapsed().as_secs_f64() * 1e6;
                    // SAFETY: every member wrote its rows of h before the arrival waited for.
                    let hv = unsafe { hbuf.read() };
                    let b_rows = adapters[l].1.batch1_rows(hv).unwrap();
                    for rows in computed {
                        // SAFETY: the rows this member computed above.
                        let y = unsafe { dst.rows_mut(rows.clone()) };
                        b_rows.rows(rows, y, true).unwrap();
                        for v in y.iter_mut() {
                            *v = v.max(0.0);
                        }
                    }
                }
                let worked = Instant::now();
                member.wait()?;
                let waited = Instant::now();
                mine[l] = (
                    (worked - start).as_secs_f64() * 1e6 - h_wait,
                    h_wait,
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
        "team_anatomy {layout} {} {} {}: {threads} threads, forward {:.3} ms (min {:.3}, max {:.3})",
        if chain { "chain" } else { "fixed" },
        if balanced { "balanced" } else { "own" },
        if lora { "lora" } else { "plain" },
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    );
    let mut sums = [0.0f64; 5];
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
            stat(&|t| t[l].2, false),
            stat(&|t| t[l].2, true),
        ];
        for (s, r) in sums.iter_mut().zip(row) {
            *s += r;
        }
        if l < 3 || l + 1 == LAYERS {
            println!(
                "  layer {l:2}: work {:6.2} mean {:6.2} max   h wait {:6.2} mean   wait {:6.2} mean {:6.2} max",
                row[0], row[1], row[2], row[3], row[4]
            );
        }
    }
    println!(
        "  all layers: work {:7.1} mean {:7.1} max   h wait {:7.1} mean   wait {:7.1} mean {:7.1} max (µs, sums of the layers' medians)",
        sums[0], sums[1], sums[2], sums[3], sums[4]
    );
}
