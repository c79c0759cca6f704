//! Splitting an output vector over the thread pool for memory-bound kernels.

use rayon::prelude::*;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Multiply-adds below which a matrix product (a GEMV, a quantized GEMV) runs on the calling
/// thread. A rank-32 LoRA factor of a 1024-wide layer (`[32, 1024]` or `[1024, 32]`, 32 K
/// multiply-adds, 128 KiB of f32) stays below: it took 5-10 µs on one thread (2-core Zen 3,
/// weights from DRAM: 5.2-6.4 µs for `[32, 1024]`, 6.4-10.0 µs for `[1024, 32]`), two threads
/// saved 0.5-3.5 µs of that, and a fork-join of a 16-thread pool costs more (on the order of
/// 10 µs, from the 16-core Xeon's batch-1 figures). 64 K multiply-adds took 13.2-13.9 µs on
/// one thread and 9.1-10.4 µs on two.
pub const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Calls `f(start, part)` for consecutive parts of `out` of `block` elements (the last one
/// shorter), `start` being the part's offset in `out`, on the current rayon pool.
///
/// Parts are handed out in order to whichever thread asks next, so at any moment the threads
/// work on neighbouring parts. That is what a batch-1 GEMV wants: its weights stream from DRAM,
/// and two threads streaming from the two halves of a weight on 2 MiB pages read addresses that
/// differ by exactly a multiple of 2 MiB, which land in the same DRAM banks and evict each
/// other's open rows (BigNet f32 at batch 1 on 2 threads: 5.4 ms with halves, 2.9 ms with
/// neighbouring 1 MiB parts; on 1 thread huge pages alone took it from 6.4 to 4.8 ms).
/// Neighbouring parts also balance the load when a thread is descheduled. Which thread computes
/// a part never changes its values.
///
/// ```
/// use nibble_tensor::parallel::for_each_block;
/// let mut y = vec![0usize; 10];
/// for_each_block(&mut y, 4, |start, part| {
///     for (i, v) in part.iter_mut().enumerate() {
///         *v = start + i;
///     }
/// });
/// assert_eq!(y, (0..10).collect::<Vec<_>>());
/// ```
pub fn for_each_block<T: Send>(out: &mut [T], block: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let block = block.max(1);
    let parts = out.len().div_ceil(block);
    for_each_in_order(out.chunks_mut(block).enumerate(), parts, |(p, part)| {
        f(p * block, part)
    });
}

/// Calls `f` on every item of `items` (`count` of them), on the current rayon pool: the items
/// are handed out in order, one at a time, to whichever thread asks next, with at most one
/// thread per item. With one thread (or one item) they run in order on the calling thread.
/// The core of [`for_each_block`]; also for work whose items are not parts of one slice (a
/// batch-1 product whose first items compute something the later ones wait for: an item
/// is only handed out once every item before it has been, so a later item may wait for
/// earlier ones to finish provided they never wait themselves).
///
/// ```
/// use nibble_tensor::parallel::for_each_in_order;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// let sum = AtomicUsize::new(0);
/// for_each_in_order(1..=10, 10, |v| {
///     sum.fetch_add(v, Ordering::Relaxed);
/// });
/// assert_eq!(sum.into_inner(), 55);
/// ```
pub fn for_each_in_order<I>(items: I, count: usize, f: impl Fn(I::Item) + Sync)
where
    I: Iterator + Send,
    I::Item: Send,
{
    let threads = rayon::current_num_threads().clamp(1, count.max(1));
    if threads == 1 {
        items.for_each(f);
        return;
    }
    let queue = Mutex::new(items);
    // (From outside the pool the calling thread takes items too: see `for_each_task`.)
    for_each_task(threads, |_| loop {
        // The lock guards only `next()`, which cannot panic, so it is never poisoned; if it
        // were, the iterator inside is still valid.
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        match next {
            Some(item) => f(item),
            None => break,
        }
    });
}

/// How long a caller outside the pool spins for its tasks before it parks ([`for_each_task`]).
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(50);

/// Calls `f(t)` for every `t < tasks` on the current rayon pool and returns once all are done;
/// a panic in any task is resumed here, after every task has ended.
///
/// Inside the pool this is a parallel loop. A caller outside it (a program's own thread calling
/// a batch-1 product) runs the tasks with the [`crate::hot_team`]: pool threads that linger,
/// spinning, for 100 µs after such a call, so that a run of batch-1 layers wakes the pool once
/// (one Q4 1024² layer with int8 activations, batch 1, on the 16-core Xeon: 16.7–29.1 µs →
/// 13.0–14.7 µs, candle's Q4K 13.3–15.3 µs in the same run, 2026-12-04 14:50 UTC). Where the
/// team is busy with another caller or off (`NIBBLE_LINGER_US=0`), the caller takes task 0
/// itself, hands tasks `1..tasks` to the pool as one job and waits for that job spinning for up
/// to 50 µs, then parking. Rayon's own way in from outside
/// (a parallel iterator, `install`) puts the caller to sleep on a lock until the pool is done
/// and wakes it again, which costs more than a batch-1 layer's work on many cores (one Q4
/// 1024² layer with int8 activations, batch 1: on the 2-core Zen 3 19.8 µs called from inside
/// the pool against 27–54 µs from outside, 20 µs with the caller taking a part; on the 16-core
/// Xeon 14.2–15.0 µs from inside, 21.1–21.7 from outside, 16.4–17.0 with the caller taking a
/// part and 16.4–16.9 with the caller only spinning, `examples/batch1_anatomy` of the quant
/// crate, 2026-12-04 02:13 UTC). Taking a part, the caller leaves one pool thread free, so
/// that it does not share a core with a busy one where the pool fills the machine.
///
/// ```
/// use nibble_tensor::parallel::for_each_task;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// let sum = AtomicUsize::new(0);
/// for_each_task(11, |t| {
///     sum.fetch_add(t, Ordering::Relaxed);
/// });
/// assert_eq!(sum.into_inner(), 55);
/// ```
pub fn for_each_task(tasks: usize, f: impl Fn(usize) + Sync) {
    if tasks <= 1 || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(f);
    } else if rayon::current_thread_index().is_some() {
        (0..tasks).into_par_iter().for_each(&f);
    } else if !crate::hot_team::run(tasks, &f) {
        join_from_outside(tasks, &f);
    }
}

/// Calls `f(start, part)` for consecutive parts of `out` of `len` elements (the last one
/// shorter; `start` is the part's offset), one [`for_each_task`] task per part: the split of
/// a batch-1 product's rows with one part per thread.
///
/// ```
/// use nibble_tensor::parallel::for_each_chunk;
/// let mut y = vec![0usize; 10];
/// for_each_chunk(&mut y, 4, |start, part| {
///     for (i, v) in part.iter_mut().enumerate() {
///         *v = start + i;
///     }
/// });
/// assert_eq!(y, (0..10).collect::<Vec<_>>());
/// ```
pub fn for_each_chunk<T: Send>(out: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    /// `out`'s base pointer, shared by tasks that each take a disjoint part of it.
    struct Base<T>(*mut T);
    // SAFETY: each task makes a slice of its own part only (parts are disjoint), and the
    // `&mut out` borrow outlives every task (`for_each_task` returns once all have ended).
    unsafe impl<T: Send> Sync for Base<T> {}
    let len = len.max(1);
    let total = out.len();
    let base = Base(out.as_mut_ptr());
    let base = &base;
    for_each_task(total.div_ceil(len), |p| {
        let start = p * len;
        let end = (start + len).min(total);
        // SAFETY: start < end <= total, inside `out`; no other task touches start..end.
        let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(start, part)
    });
}

/// What the caller of [`join_from_outside`] shares with the job it hands to the pool.
struct OutsideJob<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    /// Set (last) by the job once tasks `1..tasks` have ended.
    done: AtomicBool,
    /// The first panic of those tasks.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    caller: std::thread::Thread,
}

/// How long a caller outside the pool yields its core while [`on_pool_worker`]'s job (or a
/// team, [`crate::team::run`]) runs before it parks: not at all. It yielded for up to 2 ms,
/// and on the 16-core Xeon (16 threads) about one `bignet bench` series in five then took
/// 2.0–2.2 ms per batch-1 forward instead of 0.2–0.4 ms, every forward of the series: a pool
/// thread the job needed waited for a core that the yielding caller kept (with the caller
/// spinning instead of yielding every forward took 2.2–2.4 ms, the patience plus the work).
/// Parked at once, the caller leaves its core to the pool. Two leases, five rounds of nine
/// variants each way (2026-12-06 09:00 and 09:07 UTC, int8 and f32 activations, batch 1,
/// medians of 30): yielding had 1 and 8 stalled series of 45, parking none, with the same
/// medians otherwise (bignet 0.321–0.497 against 0.337–0.386 ms, low_precision with int8
/// activations 0.185–0.229 against 0.181–0.223); on 8 threads, and on the 2-core Xeon
/// (2 threads), the two were within the hosts' noise (2 cores: low_precision int8
/// 0.364–0.482 against 0.304–0.562 ms, bignet 1.66–2.02 against 1.70–1.97).
pub(crate) const YIELD_BEFORE_PARK: Duration = Duration::ZERO;

/// Runs `f` on a worker of the current rayon pool and returns its result (in place when the
/// calling thread is already one), so that the parallel loops inside `f` start from a worker
/// instead of injecting a job from outside and sleeping until it completes.
///
/// `rayon::scope` or `install` do the same but put the caller to sleep until `f` is done, and
/// a sleeper woken at the end waits for a core while the pool's threads spin before they
/// sleep: on the 2-core Xeon a team of 2 around 100 µs of work took 129 µs entered through
/// `rayon::scope` from outside, 102 µs from inside the pool (2026-12-05). Here the caller
/// parks until the job wakes it (it yielded its core for up to 2 ms first until
/// 2026-12-06: see `YIELD_BEFORE_PARK` in this module). A panic in `f` is resumed on the caller.
///
/// ```
/// use nibble_tensor::parallel::on_pool_worker;
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
/// let data = vec![1u64, 2, 3];
/// // From outside any pool: f runs on a worker of the global pool.
/// let sum = on_pool_worker(|| {
///     assert!(rayon::current_thread_index().is_some());
///     data.iter().sum::<u64>()
/// });
/// assert_eq!(sum, 6);
/// // Inside a pool: in place.
/// assert_eq!(pool.install(|| on_pool_worker(|| rayon::current_num_threads())), 2);
/// ```
pub fn on_pool_worker<R, F>(f: F) -> R
where
    R: Send,
    F: FnOnce() -> R + Send,
{
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let handoff = Handoff {
        f: Mutex::new(Some(f)),
        out: Mutex::new(None),
        done: AtomicBool::new(false),
        caller: std::thread::current(),
    };
    let at = &handoff as *const Handoff<F, R> as usize;
    // A plain function, so that the spawned closure is `'static` whatever `F` and `R` are.
    let entry: fn(usize) = run_handoff::<F, R>;
    rayon::spawn(move || entry(at));
    wait_until(
        || handoff.done.load(Ordering::Acquire),
        YIELD_BEFORE_PARK,
        std::thread::yield_now,
    );
    let out = handoff.out.into_inner().unwrap_or_else(|e| e.into_inner());
    match out.expect("the job stores its result before `done`") {
        Ok(r) => r,
        Err(p) => resume_unwind(p),
    }
}

/// Returns once `done()` holds: `pause` (a spin hint, or yielding the core) between looks
/// for `patience`, then parked between looks (whoever makes `done()` true unparks the
/// waiting thread; a spurious wake-up only looks again).
pub(crate) fn wait_until(done: impl Fn() -> bool, patience: Duration, pause: fn()) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() < patience {
            pause();
        } else {
            std::thread::park();
        }
    }
}

/// [`on_pool_worker`]'s job on the caller's stack.
struct Handoff<F, R> {
    f: Mutex<Option<F>>,
    out: Mutex<Option<std::thread::Result<R>>>,
    done: AtomicBool,
    caller: std::thread::Thread,
}

/// The worker's side of [`on_pool_worker`]: `at` is the address of the caller's `Handoff`.
fn run_handoff<F, R>(at: usize)
where
    R: Send,
    F: FnOnce() -> R + Send,
{
    // SAFETY: the caller keeps the `Handoff` at `at` on its stack until it has seen `done`
    // (it waits for that before anything else), and storing `done` is this job's last access
    // to it (the caller's handle is cloned first); `f` runs inside `catch_unwind`, so `done`
    // is always stored.
    let handoff = unsafe { &*(at as *const Handoff<F, R>) };
    let f = handoff
        .f
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .expect("a handoff runs once");
    let out = catch_unwind(AssertUnwindSafe(f));
    *handoff.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
    let caller = handoff.caller.clone();
    handoff.done.store(true, Ordering::Release);
    caller.unpark();
}

/// [`for_each_task`] from a thread outside the pool (`tasks >= 2`).
fn join_from_outside(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let job = OutsideJob {
        f,
        tasks,
        done: AtomicBool::new(false),
        panic: Mutex::new(None),
        caller: std::thread::current(),
    };
    let addr = &job as *const OutsideJob<'_> as usize;
    rayon::spawn(move || {
        // SAFETY: `job` stays on the caller's stack until the caller has seen `done` (it
        // waits for it below even when its own task panics), and storing `done` is this
        // job's last access to it.
        let job = unsafe { &*(addr as *const OutsideJob<'_>) };
        let ran = catch_unwind(AssertUnwindSafe(|| {
            (1..job.tasks).into_par_iter().for_each(|t| (job.f)(t))
        }));
        if let Err(p) = ran {
            *job.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        let caller = job.caller.clone();
        job.done.store(true, Ordering::Release);
        caller.unpark();
    });
    let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
    wait_until(
        || job.done.load(Ordering::Acquire),
        SPIN_BEFORE_PARK,
        std::hint::spin_loop,
    );
    if let Err(p) = mine {
        resume_unwind(p);
    }
    if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_visited_once_with_its_offset() {
        for (len, block) in [
            (0, 4),
            (1, 4),
            (7, 3),
            (33, 4),
            (64, 16),
            (1023, 32),
            (5, 0),
        ] {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![usize::MAX; len];
                pool.install(|| {
                    for_each_block(&mut y, block, |start, part| {
                        assert!(part.len() <= block.max(1));
                        for (i, v) in part.iter_mut().enumerate() {
                            assert_eq!(*v, usize::MAX, "visited twice");
                            *v = start + i;
                        }
                    })
                });
                assert_eq!(y, (0..len).collect::<Vec<_>>(), "len {len} block {block}");
            }
        }
    }

    #[test]
    fn every_task_runs_once_from_inside_and_outside_the_pool() {
        use std::sync::atomic::AtomicUsize;
        for tasks in [0, 1, 2, 7, 17, 64] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            let count = || {
                for_each_task(tasks, |t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                })
            };
            count(); // the test's own thread: outside the pool
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            pool.install(count);
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 2),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn a_panicking_task_is_resumed_after_every_task_ended() {
        use std::sync::atomic::AtomicUsize;
        for bad in [0, 5] {
            let ended = AtomicUsize::new(0);
            let got = catch_unwind(AssertUnwindSafe(|| {
                for_each_task(8, |t| {
                    std::thread::sleep(Duration::from_millis(2));
                    ended.fetch_add(1, Ordering::Relaxed);
                    assert_ne!(t, bad, "task {t} fails");
                })
            }));
            let msg = got.expect_err("the panic reaches the caller");
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains(&format!("task {bad} fails")), "{msg}");
            assert_eq!(ended.load(Ordering::Relaxed), 8, "every task ended first");
        }
    }
}
