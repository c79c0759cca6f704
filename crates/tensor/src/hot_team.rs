//! Pool threads that *linger* after a batch-1 product called from outside the pool, spinning
//! for the next one instead of going back to sleep.
//!
//! A program's own thread calling one quantized layer at batch 1 (a token-by-token decode, a
//! benchmark's loop) hands a few µs of work to each pool thread per call. Rayon's threads fall
//! asleep between such calls, and waking 16 of them costs more than the work: on the 16-core
//! Xeon one Q4 1024² layer with int8 activations took 14–15 µs called from inside the pool and
//! 16–17 µs from outside, where a 64-row block is 3–5 µs of one thread's work
//! (`batch1_anatomy`, 2026-12-04 02:13 UTC, before this team). ggml's thread
//! pool polls for the next graph for the same reason.
//!
//! [`run`] hands `tasks` to the *hot team*: `threads − 1` pool threads (one thread stays free for
//! the caller, which takes tasks too) that, once started by a [`rayon::spawn_broadcast`], spin
//! on a job slot until [`linger`] has passed since the last job ended, then return to the pool.
//! Participant `p` (the caller is the last) takes task `p` first, so that the same thread
//! computes the same rows call after call, with their weights in its cache; then any task left
//! goes to whoever asks next, so a member that is late, descheduled or already gone only costs
//! its share of speed, never correctness, and which thread runs a task never changes its
//! values. One caller at a time: a second thread calling meanwhile gets
//! `false` and takes the ordinary way ([`crate::parallel::for_each_task`]).
//!
//! While members linger, other work handed to the pool waits for them to leave (at most
//! [`linger`], 100 µs unless `NIBBLE_LINGER_US` says otherwise; `0` turns the team off).
//!
//! # No line that every thread writes
//! A first version counted members in and out, handed out tasks and counted ended tasks with
//! read-modify-writes of shared atomics, which 16 threads queue for on their cache lines: one
//! Q4 1024² layer with int8 activations from outside the pool took 15.0 µs (median; min 12.1)
//! on the 16-core Xeon, against 11.0 (min 9.2) now (`batch1_anatomy`, 2026-12-04 15:06 UTC).
//! Now every write goes to a line of its own, keyed by the job's *epoch* (so nothing is reset
//! between jobs):
//! - the slot (epoch and an *open* bit) is written by the caller only;
//! - member `p` publishes `entered[p] = epoch`, checks that the slot is still open for that
//!   epoch (else it leaves at once), and publishes `left[p] = epoch` once it is done with the
//!   job; the caller, after closing the slot, waits for `left[p]` of every member whose
//!   `entered[p]` it sees. Both sides store, fence and then load (sequentially consistent), so
//!   either the member sees the slot closed or the caller sees it entered: no member touches
//!   the job (on the caller's stack) after [`run`] returns;
//! - task `t < 64` is taken by a compare-exchange of its own flag from an older epoch to this
//!   one (uncontended when each participant takes its own task); tasks from 64 on share a
//!   counter. The caller, once its own pass over the tasks has returned, has seen every task
//!   taken (it takes what no member did), and only a member that entered takes one, running it
//!   before it leaves: so the members' `left` marks tell that every task has ended. (An
//!   earlier version also marked each task ended and had the caller read those marks before it
//!   closed the slot: one more transfer between cores per call, done while the members could
//!   still be working now.)

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lingering time without `NIBBLE_LINGER_US`, µs.
const DEFAULT_LINGER_US: u64 = 100;
/// The longest lingering time `NIBBLE_LINGER_US` may ask for, µs (one second).
const MAX_LINGER_US: u64 = 1_000_000;

/// How long members spin for a next job after the last one ended: `NIBBLE_LINGER_US`
/// microseconds (read once; at most one second), else 100 µs; at least three quarters of it
/// (the deadline moves in steps of a quarter, see `Team::extend`). Zero turns the team off
/// ([`run`] returns `false`). A value that is not a whole number of microseconds is reported on
/// stderr and the default kept, as `NIBBLE_KERNEL` does.
pub fn linger() -> Duration {
    static LINGER: OnceLock<Duration> = OnceLock::new();
    *LINGER.get_or_init(|| {
        let us = match std::env::var("NIBBLE_LINGER_US") {
            Err(_) => DEFAULT_LINGER_US,
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(us) if us <= MAX_LINGER_US => us,
                _ => {
                    eprintln!(
                        "nibble: NIBBLE_LINGER_US={v:?} is not a number of microseconds from 0 \
                         to {MAX_LINGER_US}; using {DEFAULT_LINGER_US}"
                    );
                    DEFAULT_LINGER_US
                }
            },
        };
        Duration::from_micros(us)
    })
}

/// Tasks with flags of their own (the rest share a counter).
const FLAGGED: usize = 64;

/// A value on a cache line (pair) of its own.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// A member's marks: the epoch of the last job it entered and of the last it left.
#[derive(Default)]
struct MemberMarks {
    entered: AtomicU64,
    left: AtomicU64,
}

/// A task's mark: the epoch of the last job that took it.
#[derive(Default)]
struct TaskMarks {
    taken: AtomicU64,
}

/// A job on the caller's stack.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    epoch: u64,
    /// The next task from [`FLAGGED`] on to hand out.
    next: AtomicUsize,
    /// The first panic of a task.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Job<'_> {
    /// Runs tasks as participant `p` (members `0..threads − 1`, the caller `threads − 1`):
    /// task `p` first, so that from call to call the same thread computes the same rows (whose
    /// weights its cache then holds), then any left.
    fn work(&self, team: &Team, p: usize) {
        let flagged = self.tasks.min(FLAGGED);
        let take = |t: usize| {
            let marks = &team.tasks[t].0;
            let seen = marks.taken.load(Ordering::Relaxed);
            seen != self.epoch
                && marks
                    .taken
                    .compare_exchange(seen, self.epoch, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
        };
        for t in (p..flagged).chain(0..p.min(flagged)) {
            if take(t) {
                self.run(t);
            }
        }
        loop {
            let t = FLAGGED + self.next.fetch_add(1, Ordering::Relaxed);
            if t >= self.tasks {
                return;
            }
            self.run(t);
        }
    }

    /// Runs task `t`, keeping a panic for the caller.
    fn run(&self, t: usize) {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.f)(t))) {
            let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(p);
        }
    }
}

/// What members spin on: the open job's epoch and address, on a line of their own that only
/// callers write (twice a job).
#[derive(Default)]
struct Post {
    /// The open job's epoch times two, plus one while it is open.
    slot: AtomicU64,
    /// The open job's address (valid while the slot is open or members are inside).
    job: AtomicUsize,
}

/// The process's hot team (for the global pool: callers outside every pool use that one).
///
/// Each field that one side writes and the other reads lies on a line of its own: with the
/// caller's bookkeeping (`busy`, `until`) on the line the members spin on, every call took that
/// line from them five or six times, each a transfer between cores (one Q4 1024² layer with
/// int8 activations on 2 threads, back to back: the caller's task began 410 ns after x was
/// prepared and `run` returned 600 ns after the last task ended; 2-core Xeon, 2026-12-05).
struct Team {
    post: Padded<Post>,
    /// Per participant (members, then the caller).
    members: Box<[Padded<MemberMarks>]>,
    /// Per task below [`FLAGGED`].
    tasks: Box<[Padded<TaskMarks>]>,
    /// Members started and not yet gone.
    live: Padded<AtomicUsize>,
    /// Nanoseconds after [`Team::start`] until which members linger (read by members every
    /// 64 spins; written by [`Team::extend`] only when it moves by a quarter of [`linger`]).
    until: Padded<AtomicU64>,
    /// A caller is using the team.
    busy: Padded<AtomicBool>,
    start: Instant,
}

/// The hot team, once a caller has needed it.
static TEAM: OnceLock<Team> = OnceLock::new();

fn team() -> &'static Team {
    TEAM.get_or_init(|| Team {
        post: Padded::default(),
        members: (0..rayon::current_num_threads().max(1))
            .map(|_| Padded::default())
            .collect(),
        tasks: (0..FLAGGED).map(|_| Padded::default()).collect(),
        live: Padded::default(),
        until: Padded::default(),
        busy: Padded::default(),
        start: Instant::now(),
    })
}

impl Team {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Members may linger until [`linger`] from now, give or take a quarter of it: the line is
    /// written only where its time is more than a quarter of [`linger`] short of that (a read
    /// otherwise, which leaves the members' copies in place).
    fn extend(&self) {
        let linger = linger().as_nanos() as u64;
        let until = self.now() + linger;
        if self.until.0.load(Ordering::Relaxed) < until - linger / 4 {
            self.until.0.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Member `p`'s life: run every open job it has not run, until the lingering time is over.
    fn member(&self, p: usize) {
        let marks = &self.members[p].0;
        let mut last = marks.left.load(Ordering::Relaxed);
        let mut spins = 0u32;
        loop {
            let slot = self.post.0.slot.load(Ordering::Acquire);
            let epoch = slot >> 1;
            if slot & 1 == 1 && epoch != last {
                last = epoch;
                marks.entered.store(epoch, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if self.post.0.slot.load(Ordering::SeqCst) == slot {
                    // SAFETY: this member is marked as entered into the open job of this epoch
                    // and saw the slot still open after that, so the caller (which closes the
                    // slot before it reads the marks) waits for this member's `left` mark
                    // before it returns and the job leaves its stack; the address was stored
                    // before the slot opened (Acquire above, Release there).
                    let job =
                        unsafe { &*(self.post.0.job.load(Ordering::Relaxed) as *const Job<'_>) };
                    job.work(self, p);
                }
                // Release: this member's last access to the job happens before the caller
                // sees the mark.
                marks.left.store(epoch, Ordering::Release);
                spins = 0;
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && self.now() > self.until.0.load(Ordering::Relaxed) {
                break;
            }
            std::hint::spin_loop();
        }
        self.live.0.fetch_sub(1, Ordering::Release);
    }
}

/// Sends the lingering members back to the pool now (they leave within a few spins), for work
/// that needs every pool thread ([`crate::team::run`]).
pub fn disband() {
    if let Some(team) = TEAM.get() {
        team.until.0.store(0, Ordering::Relaxed);
    }
}

/// Runs `f(t)` for every `t < tasks` on the hot team and the calling thread (which must be
/// outside every rayon pool) and returns `true` once all have ended, resuming the first panic
/// of a task after that; returns `false`, having run nothing, where the team is off
/// ([`linger`] zero), the global pool has one thread, or another caller holds the team.
pub fn run(tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let threads = rayon::current_num_threads();
    if linger().is_zero() || threads < 2 || rayon::current_thread_index().is_some() {
        return false;
    }
    let team = team();
    if team.members.len() != threads
        || team
            .busy
            .0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        return false;
    }
    team.extend();
    // Members spawned and not gone, those still queued behind other work included: below the
    // team's size (the first call, or members left while a call came), spawn a team again;
    // a thread whose member is still there runs its new one after it.
    let wanted = threads - 1;
    if team.live.0.load(Ordering::Acquire) < wanted {
        team.live.0.fetch_add(wanted, Ordering::AcqRel);
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() < wanted {
                self::team().member(ctx.index());
            }
        });
    }
    let epoch = (team.post.0.slot.load(Ordering::Relaxed) >> 1) + 1;
    let job = Job {
        f,
        tasks,
        epoch,
        next: AtomicUsize::new(0),
        panic: Mutex::new(None),
    };
    team.post
        .0
        .job
        .store(&job as *const Job<'_> as usize, Ordering::Relaxed);
    team.post.0.slot.store(epoch << 1 | 1, Ordering::SeqCst);
    // Every task taken (the caller takes what no member did) and the caller's ended.
    job.work(team, wanted);
    let wait = |done: &dyn Fn() -> bool| {
        let mut spins = 0u32;
        while !done() {
            spins = spins.wrapping_add(1);
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    };
    // Close the job, then wait for the members that entered it to leave it: each ran the tasks
    // it took before leaving (Release there, Acquire here: their writes are seen).
    team.post.0.slot.store(epoch << 1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    for m in &team.members[..wanted] {
        if m.0.entered.load(Ordering::SeqCst) == epoch {
            wait(&|| m.0.left.load(Ordering::Acquire) == epoch);
        }
    }
    team.extend();
    team.busy.0.store(false, Ordering::Release);
    if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(p);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `tasks` of `f` on the hot team, waiting while another caller (a test running
    /// beside this one) holds it: `Ok` once the team ran them, `Err` with a task's panic.
    fn on_team(tasks: usize, f: &(dyn Fn(usize) + Sync)) -> std::thread::Result<()> {
        let start = Instant::now();
        loop {
            match catch_unwind(AssertUnwindSafe(|| run(tasks, f))) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "the hot team never took the job"
                    );
                    std::thread::yield_now();
                }
                Err(p) => return Err(p),
            }
        }
    }

    /// Whether the global pool can have a hot team (else the test says so and skips).
    fn team_possible(test: &str) -> bool {
        let ok = rayon::current_num_threads() > 1 && !linger().is_zero();
        if !ok {
            println!("{test}: skipped (a pool of one thread, or NIBBLE_LINGER_US=0)");
        }
        ok
    }

    /// `run` returns only after every task has ended, including a slow one a member runs
    /// while the caller, done with its own, closes the job (the caller waits for the members'
    /// `left` marks, not for a mark per task).
    #[test]
    fn a_slow_member_task_ends_before_run_returns() {
        if !team_possible("a_slow_member_task_ends_before_run_returns") {
            return;
        }
        let spin = |us: u64| {
            let start = Instant::now();
            while start.elapsed() < Duration::from_micros(us) {
                std::hint::spin_loop();
            }
        };
        // One task per participant: the first member's own (task 0) slow, the others (the
        // caller's among them) long enough for every member to have taken its own first.
        let tasks = rayon::current_num_threads();
        for round in 0..20 {
            let ended: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            on_team(tasks, &|t| {
                spin(if t == 0 { 400 } else { 100 });
                ended[t].store(1, Ordering::Relaxed);
            })
            .unwrap();
            let done: Vec<usize> = ended.iter().map(|e| e.load(Ordering::Relaxed)).collect();
            assert!(done.iter().all(|&d| d == 1), "round {round}: {done:?}");
        }
    }

    #[test]
    fn every_task_runs_once_and_panics_reach_the_caller() {
        if !team_possible("every_task_runs_once_and_panics_reach_the_caller") {
            return;
        }
        for round in 0..50 {
            for tasks in [0usize, 1, 2, 7, 16, 63, 64, 65, 130] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                on_team(tasks, &|t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{tasks} tasks"
                );
            }
            if round % 10 == 0 {
                // Let the members leave, so that the next round starts a new team.
                std::thread::sleep(linger() * 3);
            }
        }
        let caught = on_team(8, &|t| {
            if t == 5 {
                panic!("task 5");
            }
        });
        assert!(caught.is_err(), "the panic was lost");
        // The team takes jobs again after a panic, and runs every task.
        let count = AtomicUsize::new(0);
        on_team(9, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(count.into_inner(), 9);
    }

    #[test]
    fn callers_on_several_threads_each_run_their_tasks_once() {
        std::thread::scope(|s| {
            for caller in 0..4 {
                s.spawn(move || {
                    for _ in 0..200 {
                        let hits: Vec<AtomicUsize> = (0..13).map(|_| AtomicUsize::new(0)).collect();
                        let f = |t: usize| {
                            hits[t].fetch_add(caller + 1, Ordering::Relaxed);
                        };
                        if !run(13, &f) {
                            (0..13).for_each(f);
                        }
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == caller + 1));
                    }
                });
            }
        });
    }
}
