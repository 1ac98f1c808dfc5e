//! Open-loop send times, released precisely.
//!
//! Tokio's timer rounds every deadline up to its next millisecond tick. Workers that slept
//! on it sent each request up to a millisecond (about 1.1 ms at the median) after its
//! intended time, and the latency measured from the intended time counted that delay as the
//! server's: an open-loop run at 500 appends/s against a single node read p50 1.44 ms while
//! one closed-loop connection read 0.31 ms. It also sent the requests due within a
//! millisecond together, a burst the server could batch, which real clients spread over many
//! machines do not send. A timerfd on the runtime's reactor wakes the pacer task within a few
//! tens of microseconds of each due time instead, and the workers it releases run on the
//! same thread (a pacer thread of its own cost about two more context switches per request).
//!
//! Send `j` of the run (counting over all workers) is due at `start + j / rate` and belongs to
//! worker `j % workers`, so each worker keeps a fixed spacing and their sends interleave
//! evenly. The pacer only says when a send may start; a worker still busy with its previous
//! request starts the next one late, and that delay counts against the server (it is what
//! coordinated omission hides).

use crate::stats::histogram;
use hdrhistogram::Histogram;
use rustix::fd::OwnedFd;
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// When send `j` is due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate: f64,
    workers: usize,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64, workers: usize) -> Schedule {
        Schedule {
            start,
            rate: rate.max(1e-9),
            workers: workers.max(1),
        }
    }

    /// When send `j` (over all workers) is due.
    pub fn due(&self, j: u64) -> Instant {
        self.start + Duration::from_secs_f64(j as f64 / self.rate)
    }

    /// The run-wide number of `worker`'s `k`-th send.
    pub fn send_number(&self, worker: usize, k: u64) -> u64 {
        k * self.workers as u64 + worker as u64
    }
}

/// One worker's share of the releases.
struct Gate {
    /// How many of the worker's sends are released.
    released: AtomicU64,
    wake: Notify,
}

/// Releases the sends due before `end` from a task of its own.
pub struct Pacer {
    schedule: Schedule,
    gates: Arc<Vec<Gate>>,
    task: JoinHandle<Result<Histogram<u64>, String>>,
}

impl Pacer {
    /// Starts the pacer task (on the current Tokio runtime).
    pub fn start(schedule: Schedule, end: Instant) -> Result<Pacer, String> {
        let timer = Timer::new().map_err(|e| format!("cannot create the pacer's timer: {e}"))?;
        let gates: Arc<Vec<Gate>> = Arc::new(
            (0..schedule.workers)
                .map(|_| Gate {
                    released: AtomicU64::new(0),
                    wake: Notify::new(),
                })
                .collect(),
        );
        let task = tokio::spawn(release(schedule, end, gates.clone(), timer));
        Ok(Pacer {
            schedule,
            gates,
            task,
        })
    }

    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Waits until `worker`'s `k`-th send is released.
    pub async fn released(&self, worker: usize, k: u64) {
        let Some(gate) = self.gates.get(worker) else {
            return;
        };
        // `notify_one` keeps a permit when nobody waits, so a release between the check and
        // the wait is not lost.
        while gate.released.load(Ordering::Acquire) <= k {
            gate.wake.notified().await;
        }
    }

    /// How late the pacer released sends (µs after their due time), once it has finished.
    pub async fn finish(self) -> Result<Histogram<u64>, String> {
        self.task
            .await
            .map_err(|e| format!("the pacer crashed: {e}"))?
    }
}

/// The pacer task: waits until each send is due, then releases it, recording its own
/// lateness. At the end (or if its timer fails) releases everything, so no worker waits for
/// a send that its own arithmetic put before `end` and the pacer's after.
async fn release(
    schedule: Schedule,
    end: Instant,
    gates: Arc<Vec<Gate>>,
    timer: Timer,
) -> Result<Histogram<u64>, String> {
    let mut late = histogram();
    let mut j = 0u64;
    let mut failed = None;
    loop {
        let due = schedule.due(j);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            if let Err(e) = timer.sleep(due - now).await {
                failed = Some(format!("the pacer's timer failed: {e}"));
                break;
            }
        }
        let _ = late.record(due.elapsed().as_micros().max(1) as u64);
        let gate = &gates[(j % gates.len() as u64) as usize];
        gate.released.fetch_add(1, Ordering::AcqRel);
        gate.wake.notify_one();
        j += 1;
    }
    for gate in gates.iter() {
        gate.released.store(u64::MAX, Ordering::Release);
        gate.wake.notify_one();
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(late),
    }
}

/// A one-shot timer with nanosecond resolution, driven by the runtime's reactor.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn new() -> std::io::Result<Timer> {
        let fd = rustix::time::timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: the `OwnedFd` is the timer's only owner and moves into the `AsyncFd`, so
        // the descriptor stays open, and the same, for as long as the registration lives.
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Timer(registered))
    }

    async fn sleep(&self, after: Duration) -> std::io::Result<()> {
        // A zero value would disarm the timer instead of firing at once.
        let after = after.max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: rustix::time::Timespec {
                tv_sec: after.as_secs() as _,
                tv_nsec: after.subsec_nanos() as _,
            },
        };
        rustix::time::timerfd_settime(self.0.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        loop {
            let mut ready = self.0.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| {
                rustix::io::read(fd.get_ref(), &mut expirations).map_err(std::io::Error::from)
            }) {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_interleave_evenly() {
        let start = Instant::now();
        let s = Schedule::new(start, 1000.0, 4);
        assert_eq!(s.send_number(0, 0), 0);
        assert_eq!(s.send_number(3, 0), 3);
        assert_eq!(s.send_number(1, 2), 9);
        assert_eq!(s.due(9) - start, Duration::from_millis(9));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sends_are_released_on_time_and_in_turn() {
        let start = Instant::now() + Duration::from_millis(20);
        let schedule = Schedule::new(start, 2000.0, 2);
        let end = schedule.due(200);
        let pacer = Arc::new(Pacer::start(schedule, end).unwrap());
        let mut workers = Vec::new();
        for w in 0..2 {
            let pacer = pacer.clone();
            workers.push(tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                let mut early = 0;
                for k in 0..100 {
                    let due = pacer.schedule().due(pacer.schedule().send_number(w, k));
                    pacer.released(w, k).await;
                    let now = Instant::now();
                    if now < due {
                        early += 1;
                    }
                    worst = worst.max(now.saturating_duration_since(due));
                }
                (early, worst)
            }));
        }
        for w in workers {
            let (early, worst) = w.await.unwrap();
            assert_eq!(early, 0, "no send is released before it is due");
            // Generous: a busy CI box may hold the runtime up now and then.
            assert!(
                worst < Duration::from_millis(50),
                "worst lateness {worst:?}"
            );
        }
        let pacer = Arc::try_unwrap(pacer).ok().unwrap();
        let late = pacer.finish().await.unwrap();
        assert_eq!(late.len(), 200);
        // Tokio's own timer would put the median near half a millisecond.
        assert!(
            late.value_at_quantile(0.5) < 400,
            "median lateness {} µs",
            late.value_at_quantile(0.5)
        );
    }

    #[tokio::test]
    async fn a_finished_pacer_releases_every_worker() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 100.0, 3);
        let pacer = Pacer::start(schedule, start + Duration::from_millis(30)).unwrap();
        // Send 50 of worker 1 lies past the end: the release at the end still lets it go.
        tokio::time::timeout(Duration::from_secs(5), pacer.released(1, 50))
            .await
            .expect("released at the end");
        assert!(pacer.finish().await.is_ok());
    }
}
