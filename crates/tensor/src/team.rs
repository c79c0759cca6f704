//! A *team*: every thread of the current rayon pool running one closure at once, meeting at
//! spin barriers between the phases of a computation, for work too small to pay a fork-join of
//! the pool per phase.
//!
//! A batch-1 forward through a network is such work: each layer's product is a few µs per
//! thread on 16 threads, and a rayon fork-join per layer (and per LoRA adapter, LayerNorm,
//! ...) costs on the order of 10–20 µs there (the 16-core Xeon: BigNet at batch 1 took about
//! as long as PyTorch's 1.2 ms with one fork-join per layer). A team enters the pool once
//! ([`rayon::broadcast`]) and runs the layers one after the other on every thread, each
//! thread computing its blocks of rows ([`Member::blocks`]) and waiting at a barrier
//! ([`Member::wait`]) until the layer's output is complete. A phase's time is its slowest
//! member's, so [`Member::claim_blocks`] lets a member that is done with its own blocks take
//! blocks that a slower one has not started.
//!
//! Spin barriers need every member running: a team therefore runs only where it can own the
//! pool's threads. One team at a time runs in the process (others, and pools of one thread,
//! get `None` from [`run`] and take their ordinary path), and the closure must not enter the
//! pool itself (no rayon calls inside; they would run on the member's thread anyway). A member
//! that fails or panics aborts the team: the others leave their barrier instead of waiting for
//! it forever, and [`run`] returns the first error or resumes the panic.
//!
//! A team needs every thread of the pool: one busy with a long job joins when that job ends,
//! and one blocked inside a job (on a lock or a channel, which rayon advises against) holds
//! the team, as it holds any [`rayon::broadcast`], until it is released. Programs whose pool
//! jobs block on each other should leave batch-1 teams off (`NIBBLE_BATCH1_TEAM=0` for
//! BigNet's inference).

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Spins of a barrier wait before it starts yielding its core (a member may be descheduled
/// when the pool has more threads than the machine has free cores).
const SPINS_BEFORE_YIELD: u32 = 1 << 12;

/// Set while a team runs (one at a time: two teams sharing a pool would wait for each other's
/// members).
static TEAM_RUNNING: AtomicBool = AtomicBool::new(false);

/// Why a member left a phase early: another member failed or panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted;

/// An atomic on a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

/// A barrier of arrival flags for the team's members, which can be aborted.
///
/// Each member owns one counter on a cache line of its own and publishes its arrival at the
/// `n`-th barrier by storing `n` there (a plain store: no read-modify-write of a line all
/// members fight over); a waiter reads every member's counter until all have reached `n`. On
/// a 16-core server a shared arrival counter costs one contended atomic per member in series,
/// a few µs per barrier, where these flags cost about one cache-line transfer after the last
/// arrival (the waiters' loads of the members' lines are independent, so they overlap).
struct SpinBarrier {
    /// Member `i`'s count of barriers reached (arrived at).
    arrivals: Box<[Padded<AtomicUsize>]>,
    aborted: Padded<AtomicBool>,
    /// Member `i`'s blocks taken in the current round of [`Member::claim_blocks`] (see
    /// [`ClaimWord`]).
    claims: Box<[Padded<AtomicU64>]>,
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        SpinBarrier {
            arrivals: (0..threads).map(|_| Padded(AtomicUsize::new(0))).collect(),
            aborted: Padded(AtomicBool::new(false)),
            claims: (0..threads).map(|_| Padded(AtomicU64::new(0))).collect(),
        }
    }

    /// Member `index` arrives at its barrier number `epoch` (1, 2, ...) without waiting.
    fn arrive(&self, index: usize, epoch: usize) -> Result<(), Aborted> {
        if self.aborted.0.load(Ordering::Acquire) {
            return Err(Aborted);
        }
        // Release: this member's writes before the arrival are seen by whoever acquires
        // this count.
        self.arrivals[index].0.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Waits until every member has arrived at barrier `epoch`.
    fn wait_all(&self, epoch: usize) -> Result<(), Aborted> {
        let mut spins = 0u32;
        loop {
            // Every line read before testing any, so that the loads overlap. A member
            // already past this barrier has stored a larger count: it arrived too.
            let behind = self.arrivals.iter().fold(0usize, |n, a| {
                n + usize::from(a.0.load(Ordering::Acquire) < epoch)
            });
            if behind == 0 {
                return Ok(());
            }
            if self.aborted.0.load(Ordering::Acquire) {
                return Err(Aborted);
            }
            if spins < SPINS_BEFORE_YIELD {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn abort(&self) {
        self.aborted.0.store(true, Ordering::Release);
    }
}

/// A member's arrival at a barrier it has not waited at yet ([`Member::arrive`]).
#[must_use = "a barrier arrived at is waited for with Member::wait_for"]
#[derive(Debug)]
pub struct Arrival(usize);

/// One member of a running team: its index, the team's size and the team's barrier.
pub struct Member<'t> {
    index: usize,
    threads: usize,
    barrier: &'t SpinBarrier,
    /// Barriers this member has passed.
    passed: std::cell::Cell<usize>,
    /// The latest barrier this member has waited for to the end.
    waited: std::cell::Cell<usize>,
    /// Rounds of [`Member::claim_blocks`] begun, and `passed` when the latest began.
    rounds: std::cell::Cell<u32>,
    round_began: std::cell::Cell<Option<usize>>,
}

impl Member<'_> {
    /// This member's index, `0..threads()`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The team's size.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Waits until every member has arrived here (the writes each made before are then
    /// visible to all). `Err(Aborted)` when another member failed: the caller returns it.
    pub fn wait(&self) -> Result<(), Aborted> {
        let arrival = self.arrive()?;
        self.wait_for(arrival)
    }

    /// The first half of [`Member::wait`]: arrives at the team's next barrier (publishing the
    /// writes made so far) and returns without waiting, so that the member can do work the
    /// barrier does not guard before [`Member::wait_for`] waits for the others. A barrier
    /// split so costs no waiting where the others arrived during that work: a LoRA layer at
    /// batch 1 publishes its rows of `h = A x` first, then computes its rows of the base
    /// product, and only then waits for all of `h`.
    pub fn arrive(&self) -> Result<Arrival, Aborted> {
        let epoch = self.passed.get() + 1;
        self.barrier.arrive(self.index, epoch)?;
        self.passed.set(epoch);
        Ok(Arrival(epoch))
    }

    /// The second half of [`Member::wait`]: waits until every member has arrived at the
    /// barrier of `arrival` (this member's latest: call it before arriving again).
    pub fn wait_for(&self, arrival: Arrival) -> Result<(), Aborted> {
        self.barrier.wait_all(arrival.0)?;
        self.waited.set(self.waited.get().max(arrival.0));
        Ok(())
    }

    /// This member's blocks of `0..len` in blocks of `block` elements (the last one
    /// shorter): blocks `index, index + threads, index + 2·threads, ...`. Neighbouring members
    /// take neighbouring blocks, so at any moment the team streams one region of a matrix
    /// (see [`crate::parallel::for_each_block`] on why that matters for DRAM), and each member
    /// gets the same rows every call (its caches keep them where they fit).
    pub fn blocks(&self, len: usize, block: usize) -> impl Iterator<Item = Range<usize>> {
        // A block of `len` or more is all of it; clamped so that no offset overflows.
        let block = block.clamp(1, len.max(1));
        (self.index * block..len)
            .step_by(block * self.threads)
            .map(move |s| s..(s + block).min(len))
    }
}

impl<'t> Member<'t> {
    /// Member `index` of a team of `threads` meeting at `barrier`, before its first barrier.
    fn new(index: usize, threads: usize, barrier: &'t SpinBarrier) -> Self {
        Member {
            index,
            threads,
            barrier,
            passed: std::cell::Cell::new(0),
            waited: std::cell::Cell::new(0),
            rounds: std::cell::Cell::new(0),
            round_began: std::cell::Cell::new(None),
        }
    }

    /// This member's share of `0..len` in blocks of `block` elements, as [`Member::blocks`]
    /// gives it, with the work balanced: the member takes its own blocks one at a time, in
    /// order, then blocks that other members have not taken yet, from the end of the member
    /// with the most left (one who runs late, is descheduled or reads slower memory). Every
    /// block is yielded to exactly one member; which member computes a block changes no value
    /// where the blocks' results do not depend on who computes them.
    ///
    /// Every member must call it the same number of times in the same order (as a team's
    /// members run the same code) and run each iterator to its end before it next arrives at
    /// a barrier. A round then takes blocks from others only when the member has waited to the
    /// end of a barrier ([`Member::wait`], [`Member::wait_for`]) arrived at after its previous
    /// round began: every member has finished that round, so no one takes blocks of a round
    /// while another still works in the one before. Otherwise (two rounds in one phase) the
    /// round gives the member exactly its own blocks ([`Member::blocks`]), for every member
    /// alike; so it does with more than 65535 blocks a member.
    ///
    /// ```
    /// use nibble_tensor::team;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    /// let done: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
    /// pool.install(|| {
    ///     team::run(|member| -> Result<(), team::Aborted> {
    ///         for rows in member.claim_blocks(100, 8) {
    ///             for i in rows {
    ///                 done[i].fetch_add(1, Ordering::Relaxed);
    ///             }
    ///         }
    ///         member.wait()
    ///     })
    /// });
    /// assert!(done.iter().all(|d| d.load(Ordering::Relaxed) == 1));
    /// ```
    pub fn claim_blocks(&self, len: usize, block: usize) -> ClaimedBlocks<'_, 't> {
        // A block of `len` or more is all of it (as in `blocks`); clamped so that no block
        // offset overflows.
        let block = block.clamp(1, len.max(1));
        let separated = self
            .round_began
            .get()
            .is_none_or(|began| self.waited.get() > began);
        let per_member = len.div_ceil(block.saturating_mul(self.threads));
        let balanced = separated && per_member <= usize::from(u16::MAX);
        let round = if balanced {
            let r = self.rounds.get().wrapping_add(1);
            self.rounds.set(r);
            self.round_began.set(Some(self.passed.get()));
            r
        } else {
            0
        };
        ClaimedBlocks {
            member: self,
            len,
            block,
            round,
            balanced,
            own_next: 0,
            stealing: false,
        }
    }

    /// The blocks member `owner` has in `0..len`.
    fn blocks_of(&self, owner: usize, len: usize, block: usize) -> usize {
        let start = owner * block;
        if start >= len {
            0
        } else {
            (len - start).div_ceil(block * self.threads)
        }
    }

    /// Block `j` of member `owner`.
    fn block_range(&self, owner: usize, j: usize, len: usize, block: usize) -> Range<usize> {
        let start = owner * block + j * block * self.threads;
        start..(start + block).min(len)
    }
}

/// The word in which a member's blocks taken in a round of [`Member::claim_blocks`] are
/// counted: the round in the high 32 bits, blocks taken from the back (by others) in the next
/// 16, from the front (by the owner) in the low 16. A word of an older round counts as none
/// taken. Each take is one compare-exchange of the owner's word, so the front and back never
/// cross and a block goes to one member.
struct ClaimWord {
    round: u32,
    front: usize,
    back: usize,
}

impl ClaimWord {
    fn read(word: u64, round: u32) -> Self {
        if (word >> 32) as u32 == round {
            ClaimWord {
                round,
                front: (word & 0xffff) as usize,
                back: ((word >> 16) & 0xffff) as usize,
            }
        } else {
            ClaimWord {
                round,
                front: 0,
                back: 0,
            }
        }
    }

    fn encode(&self) -> u64 {
        (u64::from(self.round) << 32) | ((self.back as u64) << 16) | self.front as u64
    }
}

/// The blocks a member computes in one round of [`Member::claim_blocks`].
pub struct ClaimedBlocks<'m, 't> {
    member: &'m Member<'t>,
    len: usize,
    block: usize,
    round: u32,
    balanced: bool,
    /// Without balancing: the member's next own block.
    own_next: usize,
    stealing: bool,
}

impl ClaimedBlocks<'_, '_> {
    /// Takes the next block of `owner` from the front (the owner) or the back (another):
    /// its index among the owner's blocks, or `None` when none is left.
    fn take_block(&self, owner: usize, from_back: bool) -> Option<usize> {
        let m = self.member;
        let n = m.blocks_of(owner, self.len, self.block);
        let word = &m.barrier.claims[owner].0;
        // Relaxed: the word only decides who computes a block; the results are published by
        // the barrier after the round.
        let mut current = word.load(Ordering::Relaxed);
        loop {
            let mut w = ClaimWord::read(current, self.round);
            if w.front + w.back >= n {
                return None;
            }
            let j = if from_back {
                w.back += 1;
                n - w.back
            } else {
                w.front += 1;
                w.front - 1
            };
            match word.compare_exchange_weak(
                current,
                w.encode(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(j),
                Err(now) => current = now,
            }
        }
    }
}

impl Iterator for ClaimedBlocks<'_, '_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        let m = self.member;
        if !self.balanced {
            let j = self.own_next;
            if j >= m.blocks_of(m.index, self.len, self.block) {
                return None;
            }
            self.own_next += 1;
            return Some(m.block_range(m.index, j, self.len, self.block));
        }
        if !self.stealing {
            if let Some(j) = self.take_block(m.index, false) {
                return Some(m.block_range(m.index, j, self.len, self.block));
            }
            self.stealing = true;
        }
        loop {
            // The member with the most blocks left (all words read first: the loads overlap).
            let victim = (0..m.threads)
                .filter(|&v| v != m.index)
                .map(|v| {
                    let w =
                        ClaimWord::read(m.barrier.claims[v].0.load(Ordering::Relaxed), self.round);
                    let n = m.blocks_of(v, self.len, self.block);
                    (n.saturating_sub(w.front + w.back), v)
                })
                .max()?;
            if victim.0 == 0 {
                return None;
            }
            if let Some(j) = self.take_block(victim.1, true) {
                return Some(m.block_range(victim.1, j, self.len, self.block));
            }
        }
    }
}

/// Rows per block for a team of `threads` splitting `rows` rows: about four blocks a member,
/// a multiple of `align` (the callers' kernels process rows in groups of `align`).
///
/// ```
/// use nibble_tensor::team::block_rows;
/// assert_eq!(block_rows(1024, 16, 4), 16);
/// assert_eq!(block_rows(32, 16, 4), 4);
/// ```
pub fn block_rows(rows: usize, threads: usize, align: usize) -> usize {
    let align = align.max(1);
    rows.div_ceil(4 * threads.max(1)).div_ceil(align).max(1) * align
}

/// What the members left: the first error, or a panic's payload.
enum Failure<E> {
    Error(E),
    Panic(Box<dyn Any + Send>),
}

/// Runs `f` on every thread of the current rayon pool at once, as a team (see the [module
/// docs](self)): `None` (nothing run) when the pool has one thread or another team is
/// running, else `Some` of the first member's error, or `Ok`. A member's panic aborts the team
/// and is resumed here. `f` must not enter the pool, and must return `Err` (or let
/// [`Member::wait`]'s `Aborted` through) rather than wait once it fails.
///
/// ```
/// use nibble_tensor::team;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
/// let hits = AtomicUsize::new(0);
/// let ran = pool.install(|| {
///     team::run(|member| -> Result<(), team::Aborted> {
///         hits.fetch_add(1, Ordering::Relaxed);
///         member.wait()?;
///         // Every member has counted itself by now.
///         assert_eq!(hits.load(Ordering::Relaxed), member.threads());
///         Ok(())
///     })
/// });
/// assert_eq!(ran, Some(Ok(())));
/// ```
pub fn run<E, F>(f: F) -> Option<Result<(), E>>
where
    E: Send + From<Aborted>,
    F: Fn(&Member<'_>) -> Result<(), E> + Sync,
{
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return None;
    }
    if TEAM_RUNNING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return None;
    }
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            TEAM_RUNNING.store(false, Ordering::Release);
        }
    }
    let _release = Release;
    let barrier = SpinBarrier::new(threads);
    let failure: Mutex<Option<Failure<E>>> = Mutex::new(None);
    // Pool threads lingering after batch-1 products called from outside the pool
    // (`hot_team`) would hold the team's start until their lingering time ends.
    crate::hot_team::disband();
    if rayon::current_thread_index().is_some() {
        // Inside the pool the calling thread is one of the members.
        rayon::broadcast(|ctx| run_member(&f, &barrier, &failure, ctx.index(), ctx.num_threads()));
    } else {
        // From outside the pool `rayon::broadcast` puts the caller to sleep until the team is
        // done, and on the 2-core Xeon the woken caller then waited about 25 µs for a core
        // (the pool's threads spin a while before they sleep): every batch-1 forward paid it
        // (a team of 2 around 100 µs of work took 127 µs from outside the pool, 102 from
        // inside; 2026-12-05). So the members are spawned (`spawn_broadcast`) and the caller
        // waits for them yielding its core (`yield_now`, parking after 2 ms) rather than
        // sleeping: 102 µs.
        // Tried on the 16-core Xeon in an earlier session: the caller as the last member in
        // place of the pool's last thread, spinning for the others (no faster there).
        let launch = Launch {
            f: &f,
            barrier: &barrier,
            failure: &failure,
            done: AtomicUsize::new(0),
            caller: std::thread::current(),
        };
        let at = &launch as *const Launch<'_, F, E> as usize;
        let entry: fn(usize, usize, usize) = launch_member::<F, E>;
        rayon::spawn_broadcast(move |ctx| entry(at, ctx.index(), ctx.num_threads()));
        // Every member's last access to `launch` is its count in `done`: the frame outlives
        // them all. (The caller parks at once, `YIELD_BEFORE_PARK`; the last member to count
        // unparks it.)
        crate::parallel::wait_until(
            || launch.done.load(Ordering::Acquire) >= threads,
            crate::parallel::YIELD_BEFORE_PARK,
            std::thread::yield_now,
        );
    }
    match failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        None => Some(Ok(())),
        Some(Failure::Error(e)) => Some(Err(e)),
        Some(Failure::Panic(p)) => resume_unwind(p),
    }
}

/// One member's run of a team's closure: its failure or panic recorded (the first one kept)
/// and the barrier aborted so that the others leave it.
fn run_member<E: Send + From<Aborted>>(
    f: &(impl Fn(&Member<'_>) -> Result<(), E> + Sync),
    barrier: &SpinBarrier,
    failure: &Mutex<Option<Failure<E>>>,
    index: usize,
    threads: usize,
) {
    let record = |what: Failure<E>| {
        barrier.abort();
        let mut slot = failure.lock().unwrap_or_else(|e| e.into_inner());
        // An abort seen by others is not a failure of its own: keep the first real one.
        if slot.is_none() {
            *slot = Some(what);
        }
    };
    let member = Member::new(index, threads, barrier);
    match catch_unwind(AssertUnwindSafe(|| f(&member))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if !barrier.aborted.0.load(Ordering::Acquire) {
                record(Failure::Error(e));
            } else {
                // Left because another member failed; that one recorded its failure (or is
                // about to).
                drop(e);
            }
        }
        Err(panic) => record(Failure::Panic(panic)),
    }
}

/// What members spawned from outside the pool reach on the caller's stack ([`run`]).
struct Launch<'a, F, E> {
    f: &'a F,
    barrier: &'a SpinBarrier,
    failure: &'a Mutex<Option<Failure<E>>>,
    /// Members whose run has ended; counting itself is each member's last access.
    done: AtomicUsize,
    /// The waiting caller, unparked by the last member to count.
    caller: std::thread::Thread,
}

/// A spawned member's entry: `at` is the address of the caller's `Launch<F, E>` (a plain
/// function, so that the spawned closure is `'static` whatever `F` and `E` are).
fn launch_member<F, E>(at: usize, index: usize, threads: usize)
where
    F: Fn(&Member<'_>) -> Result<(), E> + Sync,
    E: Send + From<Aborted>,
{
    // SAFETY: `run` keeps the `Launch` at `at` alive until `done` has counted every member
    // (it waits for that before returning), and nothing below touches it after counting (the
    // caller's handle is cloned first);
    // panics inside the run are caught (`run_member`), so the count is always made.
    let launch = unsafe { &*(at as *const Launch<'_, F, E>) };
    run_member(launch.f, launch.barrier, launch.failure, index, threads);
    // Cloned before counting: once the count is in, the caller may return.
    let caller = launch.caller.clone();
    if launch.done.fetch_add(1, Ordering::Release) + 1 == threads {
        caller.unpark();
    }
}

/// A buffer the members share: each writes disjoint rows of it in a phase, and all read it
/// whole after the barrier that ends the phase.
pub struct SharedRows<'a> {
    ptr: *mut f32,
    len: usize,
    _data: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is only reached through `rows_mut` and `read`, whose contracts (disjoint
// writes, reads after a barrier) make the accesses race-free.
unsafe impl Send for SharedRows<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedRows<'_> {}

impl<'a> SharedRows<'a> {
    /// Shares `data` with the team for as long as the borrow lasts.
    pub fn new(data: &'a mut [f32]) -> Self {
        SharedRows {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            _data: std::marker::PhantomData,
        }
    }

    /// The buffer's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `range` to write (clamped to the buffer).
    ///
    /// # Safety
    /// No other member reads or writes these elements until the next barrier, and the caller
    /// holds no other view of them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn rows_mut(&self, range: Range<usize>) -> &mut [f32] {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        // SAFETY: start <= end <= len, inside the borrowed buffer; exclusive by the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }

    /// The whole buffer to read.
    ///
    /// # Safety
    /// No member writes it until the next barrier (every write to it happened before a
    /// barrier that the caller has passed).
    pub unsafe fn read(&self) -> &[f32] {
        // SAFETY: the borrowed buffer; no concurrent writes by the contract.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// [`run`] on `pool`, again until no other test's team is running.
    fn run_on<E: Send + From<Aborted>>(
        pool: &rayon::ThreadPool,
        f: impl Fn(&Member<'_>) -> Result<(), E> + Sync,
    ) -> Result<(), E> {
        Site::Pool(pool).run(f)
    }

    /// Where a test's team runs: on a pool of its own, entered from inside it, or on the
    /// global pool from this test's thread, outside it.
    enum Site<'p> {
        Pool(&'p rayon::ThreadPool),
        Outside,
    }

    impl Site<'_> {
        fn threads(&self) -> usize {
            match self {
                Site::Pool(p) => p.current_num_threads(),
                Site::Outside => rayon::current_num_threads(),
            }
        }

        /// [`run`] here, again until no other test's team is running.
        fn run<E: Send + From<Aborted>>(
            &self,
            f: impl Fn(&Member<'_>) -> Result<(), E> + Sync,
        ) -> Result<(), E> {
            loop {
                let ran = match self {
                    Site::Pool(p) => p.install(|| run(&f)),
                    Site::Outside => run(&f),
                };
                if let Some(r) = ran {
                    return r;
                }
                std::thread::yield_now();
            }
        }
    }

    /// Pools of `counts` threads, then the global pool from outside where it has two threads
    /// or more (else a printed line).
    fn each_site(counts: &[usize], mut test: impl FnMut(&Site<'_>)) {
        for &n in counts {
            test(&Site::Pool(&pool(n)));
        }
        if rayon::current_num_threads() >= 2 {
            test(&Site::Outside);
        } else {
            println!("team: the global pool has one thread: no team entered from outside");
        }
    }

    /// Claimed blocks cover `0..len` once in every round, members take others' blocks when
    /// one is late, and a second round in one phase gives each member its own blocks.
    #[test]
    fn claimed_blocks_cover_every_element_once_and_balance() {
        let stolen = AtomicUsize::new(0);
        each_site(&[2, 3, 4, 7], |site| {
            let threads = site.threads();
            for (len, block) in [
                (0, 4),
                (1, 4),
                (33, 4),
                (1023, 16),
                (130, 1),
                (7, 0),
                (9, usize::MAX),
            ] {
                let rounds = 6;
                let done: Vec<AtomicUsize> =
                    (0..len * rounds).map(|_| AtomicUsize::new(0)).collect();
                let fallback_ok = AtomicBool::new(true);
                site.run(|member| -> Result<(), Aborted> {
                    for round in 0..rounds {
                        if member.index() == round % threads {
                            // This member is late: the others take its blocks.
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                        let own: Vec<Range<usize>> = member.blocks(len, block).collect();
                        for rows in member.claim_blocks(len, block) {
                            if !own.contains(&rows) {
                                stolen.fetch_add(1, Ordering::Relaxed);
                            }
                            for i in rows {
                                done[round * len + i].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // A second round before any barrier: the member's own blocks.
                        let again: Vec<Range<usize>> = member.claim_blocks(len, block).collect();
                        if again != own {
                            fallback_ok.store(false, Ordering::Relaxed);
                        }
                        member.wait()?;
                    }
                    Ok(())
                })
                .unwrap();
                for (i, d) in done.iter().enumerate() {
                    assert_eq!(
                        d.load(Ordering::Relaxed),
                        1,
                        "element {} of round {} (len {len}, block {block}, {threads} threads)",
                        i % len.max(1),
                        i / len.max(1)
                    );
                }
                assert!(fallback_ok.load(Ordering::Relaxed));
            }
        });
        assert!(
            stolen.load(Ordering::Relaxed) > 0,
            "no block was ever taken from a late member"
        );
    }

    /// Each member's blocks, over all members, cover `0..len` once.
    #[test]
    fn blocks_cover_every_element_once() {
        for (len, block, threads) in [(0, 4, 2), (1, 4, 3), (33, 4, 2), (1023, 16, 16), (7, 0, 3)] {
            let mut seen = vec![0u32; len];
            for index in 0..threads {
                let b = SpinBarrier::new(threads);
                let m = Member::new(index, threads, &b);
                for r in m.blocks(len, block) {
                    assert!(r.len() <= block.max(1));
                    for s in &mut seen[r] {
                        *s += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{len} {block} {threads}");
        }
    }

    /// Phases separated by barriers see each other's writes: each member writes its blocks of
    /// a buffer, and after the barrier every member sums the whole of it.
    #[test]
    fn barriers_order_the_phases() {
        each_site(&[2, 3, 16], |site| {
            let threads = site.threads();
            let mut buf = vec![f32::NAN; 100];
            let shared = SharedRows::new(&mut buf);
            let sums = Mutex::new(Vec::new());
            let ran = site.run(|m| -> Result<(), Aborted> {
                for round in 0..20 {
                    for r in m.blocks(shared.len(), 7) {
                        // SAFETY: each member writes its own blocks in this phase.
                        let part = unsafe { shared.rows_mut(r.clone()) };
                        for (i, v) in part.iter_mut().enumerate() {
                            *v = (r.start + i + round) as f32;
                        }
                    }
                    m.wait()?;
                    // SAFETY: written before the barrier; rewritten after the next.
                    let s: f32 = unsafe { shared.read() }.iter().sum();
                    sums.lock().unwrap().push((round, s));
                    m.wait()?;
                }
                Ok(())
            });
            assert_eq!(ran, Ok(()));
            let sums = sums.into_inner().unwrap();
            assert_eq!(sums.len(), 20 * threads);
            for (round, s) in sums {
                assert_eq!(s, (4950 + 100 * round) as f32, "{threads} threads");
            }
        });
    }

    /// No member leaves barrier `n` before every member has arrived at it, over many barriers
    /// in a row with uneven work between them (the arrival counts only grow).
    #[test]
    fn no_member_leaves_a_barrier_early() {
        each_site(&[2, 3, 16], |site| {
            let threads = site.threads();
            let arrived = AtomicUsize::new(0);
            let ran = site.run(|m| -> Result<(), Aborted> {
                for n in 1..=300usize {
                    // Uneven work: one member is slower in turn.
                    if n % threads == m.index() {
                        for _ in 0..(n % 7) * 100 {
                            std::hint::spin_loop();
                        }
                    }
                    arrived.fetch_add(1, Ordering::AcqRel);
                    m.wait()?;
                    let seen = arrived.load(Ordering::Acquire);
                    assert!(seen >= n * threads, "barrier {n}: {seen} arrivals");
                }
                Ok(())
            });
            assert_eq!(ran, Ok(()));
        });
    }

    /// A split barrier: what each member wrote before arriving is seen by all after
    /// `wait_for`, with work in between and plain barriers around it.
    #[test]
    fn an_arrival_waited_for_later_is_a_barrier() {
        each_site(&[2, 3, 16], |site| {
            let threads = site.threads();
            let slots: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            let ran = site.run(|m| -> Result<(), Aborted> {
                for n in 1..=200usize {
                    slots[m.index()].store(n, Ordering::Relaxed);
                    let arrival = m.arrive()?;
                    // Uneven work between arriving and waiting.
                    for _ in 0..((n + m.index()) % 5) * 50 {
                        std::hint::spin_loop();
                    }
                    m.wait_for(arrival)?;
                    for (i, s) in slots.iter().enumerate() {
                        let seen = s.load(Ordering::Relaxed);
                        assert_eq!(seen, n, "round {n}: member {i}'s slot");
                    }
                    // Nobody writes round n + 1 before everyone has read round n.
                    m.wait()?;
                }
                Ok(())
            });
            assert_eq!(ran, Ok(()));
        });
    }

    /// One member's error aborts the others, which would otherwise wait at the barrier
    /// forever; the error comes back, and the next team runs.
    #[test]
    fn an_error_aborts_the_team() {
        #[derive(Debug, PartialEq)]
        enum E {
            Mine,
            Aborted,
        }
        impl From<Aborted> for E {
            fn from(_: Aborted) -> Self {
                E::Aborted
            }
        }
        each_site(&[3], |site| {
            for failing in [0, site.threads() - 1] {
                let ran = site.run(|m| {
                    if m.index() == failing {
                        return Err(E::Mine);
                    }
                    m.wait()?;
                    m.wait()?;
                    Ok(())
                });
                assert_eq!(ran, Err(E::Mine), "member {failing} failing");
                let again = site.run(|m| -> Result<(), Aborted> { m.wait() });
                assert_eq!(again, Ok(()));
            }
        });
    }

    /// A member's panic reaches the caller, and the team is released.
    #[test]
    fn a_panic_reaches_the_caller() {
        each_site(&[2], |site| {
            // The first member, and the last.
            for failing in [0, site.threads() - 1] {
                let caught = catch_unwind(AssertUnwindSafe(|| {
                    site.run(|m| -> Result<(), Aborted> {
                        if m.index() == failing {
                            panic!("member failed");
                        }
                        m.wait()
                    })
                }));
                assert!(caught.is_err(), "member {failing} panicking");
                let again = site.run(|m| -> Result<(), Aborted> { m.wait() });
                assert_eq!(again, Ok(()));
            }
        });
    }

    /// One thread, or a team already running: `None`, nothing run.
    #[test]
    fn no_team_on_one_thread_or_inside_a_team() {
        let ran = pool(1).install(|| run(|_| -> Result<(), Aborted> { panic!("ran") }));
        assert!(ran.is_none());
        let inner = Mutex::new(Vec::new());
        let ran = run_on(&pool(2), |_| -> Result<(), Aborted> {
            let nested = run(|_| -> Result<(), Aborted> { Ok(()) });
            inner.lock().unwrap().push(nested.is_none());
            Ok(())
        });
        assert_eq!(ran, Ok(()));
        assert_eq!(inner.into_inner().unwrap(), vec![true, true]);
    }
}
