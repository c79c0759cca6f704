//! Splitting an output vector over the thread pool for memory-bound kernels.

use rayon::prelude::*;
use std::sync::Mutex;

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
    (0..threads).into_par_iter().for_each(|_| loop {
        // The lock guards only `next()`, which cannot panic, so it is never poisoned; if it
        // were, the iterator inside is still valid.
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        match next {
            Some(item) => f(item),
            None => break,
        }
    });
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
}
