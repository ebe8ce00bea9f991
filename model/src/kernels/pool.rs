//! A fork-join pool whose workers spin between jobs, for the many small parallel steps of
//! decoding one token.
//!
//! A decode step of the default model is about 200 matrix-vector products of 10-60 µs each.
//! rayon's workers go to sleep when they find no work, and on a virtual machine waking a halted
//! vCPU costs about as much as the product itself: with rayon, two threads decoded no faster than
//! one (`examples/profile_decode.rs`). Here the workers spin on an epoch counter for a while after
//! each job (as llama.cpp's threads poll), so the next job starts within a microsecond, and park
//! on a condition variable once no job has come for [`SPIN`].
//!
//! One job runs at a time; [`Pool::run`] from a second thread waits for the first. Thread `0` of
//! every job is the caller itself.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

/// How long a worker spins for the next job before it parks.
const SPIN: Duration = Duration::from_millis(1);

/// A job: called once on each thread with `(thread index, thread count)`.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

struct Shared {
    /// Incremented when a job is published. (Each counter has a cache line of its own: workers
    /// poll `epoch` while others bump `done`.)
    epoch: CachePadded<AtomicUsize>,
    /// Workers (not counting the caller) that finished the current job.
    done: CachePadded<AtomicUsize>,
    /// The current job, valid while its `run` call waits for the workers.
    job: UnsafeCell<Option<Job<'static>>>,
    /// Workers parked on `wake`.
    parked: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the thread inside `Pool::run` (which holds `Pool::caller`),
// before the epoch increment that publishes it (Release), and read by workers after they observe
// that increment (Acquire); it is not written again until every worker has reported `done`.
unsafe impl Sync for Shared {}

/// A spinning fork-join pool of `threads - 1` workers plus the caller.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    caller: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Pool {
    /// A pool of `threads` threads in all (at least 1: the caller).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: CachePadded::new(AtomicUsize::new(0)),
            done: CachePadded::new(AtomicUsize::new(0)),
            job: UnsafeCell::new(None),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        for i in 1..threads {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("hive-decode-{i}"))
                .spawn(move || worker(&s, i, threads));
            if spawned.is_err() {
                // No thread: run everything on the caller.
                return Pool {
                    shared,
                    threads: 1,
                    caller: Mutex::new(()),
                };
            }
        }
        Pool {
            shared,
            threads,
            caller: Mutex::new(()),
        }
    }

    /// The process-wide pool, sized like rayon's global pool (`RAYON_NUM_THREADS`, `--threads`)
    /// when first used, and at most one thread per CPU this process may use.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            // More spinning threads than CPUs would wait on each other's time slices.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            Pool::new(rayon::current_num_threads().min(cpus))
        })
    }

    /// Threads a job runs on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i, n)` on every thread `i < n` of the pool (the caller is thread 0) and returns
    /// when all have finished. A panic in a worker's share aborts the process (it cannot be
    /// handed back to the caller).
    ///
    /// # Panics
    /// When called from inside a job of a pool (which would otherwise deadlock).
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.threads == 1 {
            f(0, 1);
            return;
        }
        assert!(
            !IN_JOB.with(Cell::get),
            "Pool::run called from inside a pool job"
        );
        let _one = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        IN_JOB.with(|c| c.set(true));
        let _reset = ResetInJob;
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only while this call waits for every worker to finish
        // with the job (below), so no worker uses `f` after it is gone; see `Shared`.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<Job<'_>, Job<'static>>(f));
        }
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        {
            let parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
            if *parked > 0 {
                s.wake.notify_all();
            }
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, self.threads)));
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.threads - 1 {
            pause(&mut spins);
        }
        // SAFETY: every worker has finished with the job.
        unsafe {
            *s.job.get() = None;
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _g = self.shared.parked.lock();
        self.shared.wake.notify_all();
    }
}

/// One round of waiting: a few hundred CPU pauses, then yields, so that a thread the waiter
/// waits for gets the CPU when there are more runnable threads than CPUs (other processes, or
/// tests running side by side).
fn pause(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins < 256 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

thread_local! {
    /// Set while this thread runs its share of a job (for the whole life of a worker).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Clears [`IN_JOB`] when the caller's `run` ends, however it ends.
struct ResetInJob;

impl Drop for ResetInJob {
    fn drop(&mut self) {
        IN_JOB.with(|c| c.set(false));
    }
}

fn worker(s: &Shared, index: usize, threads: usize) {
    IN_JOB.with(|c| c.set(true));
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if spins % 1024 == 1023 && start.elapsed() > SPIN {
                let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                *parked += 1;
                while s.epoch.load(Ordering::Acquire) == seen && !s.stop.load(Ordering::Acquire) {
                    parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                }
                *parked -= 1;
            } else {
                pause(&mut spins);
            }
        }
        // SAFETY: the epoch we observed (Acquire) was published after the job was stored, and the
        // job stays valid until we report `done`.
        let job = unsafe { *s.job.get() };
        if let Some(f) = job {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index, threads)));
            if ok.is_err() {
                std::process::abort();
            }
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

/// The part of `0..n` that thread `i` of `t` takes, in whole multiples of `align` (the last
/// thread takes the remainder).
pub fn share(n: usize, i: usize, t: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let lo = (units * i / t * align).min(n);
    let hi = (units * (i + 1) / t * align).min(n);
    lo..hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_its_share_once_per_job() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i, t| {
                for j in share(n, i, t, 8) {
                    hits[j].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 4);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn callers_on_two_threads_take_turns() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        pool.run(&|_, _| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 2 * 200 * 2);
    }

    #[test]
    fn a_job_that_starts_another_panics_instead_of_deadlocking() {
        let pool = Pool::new(2);
        let nested = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 0 {
                    pool.run(&|_, _| {});
                }
            })
        }));
        assert!(nested.is_err());
        // The pool still works, and the caller may start jobs again.
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn shares_cover_the_range_in_aligned_pieces() {
        for n in [0usize, 5, 8, 63, 64, 65, 1536] {
            for t in 1..5 {
                let parts: Vec<_> = (0..t).map(|i| share(n, i, t, 8)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[t - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].end % 8 == 0 || w[0].end == n);
                }
            }
        }
    }
}
