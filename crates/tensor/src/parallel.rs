//! Splitting an output vector over the thread pool for memory-bound kernels.

use rayon::prelude::*;
use std::sync::Mutex;

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
    let threads = rayon::current_num_threads().clamp(1, parts.max(1));
    if threads == 1 {
        for (p, part) in out.chunks_mut(block).enumerate() {
            f(p * block, part);
        }
        return;
    }
    let queue = Mutex::new(out.chunks_mut(block).enumerate());
    (0..threads).into_par_iter().for_each(|_| loop {
        // The lock guards only `next()`, which cannot panic, so it is never poisoned; if it
        // were, the iterator inside is still valid.
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        match next {
            Some((p, part)) => f(p * block, part),
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
