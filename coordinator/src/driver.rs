//! The one loop that drives the coordinator's state: reads are single steps ahead of the
//! queue, everything else is handled in order in batches (see [`run`]), and the state is
//! woken
//! exactly when its earliest timer is due (the planner's stripe updates, retries
//! and stuck checks; URL fetch timeouts; housekeeping), not on a fixed tick. The real clock
//! is read here and nowhere in the state.
//!
//! A panic in the state ends the loop: the state is dropped (its queued writes still land)
//! and the reason is recorded in [`Down`] before the request channel closes, so every
//! caller waiting on it is failed with that reason at once, and the health watchdog
//! (`crate::health`) takes the coordinator out of service and makes it exit.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use shoal_planner::Time;
use tokio::sync::{mpsc, oneshot};

use crate::state::{Now, Request, State};

/// Monotonic time since the coordinator started, and the wall clock.
#[derive(Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    pub fn now(&self) -> Now {
        Now {
            mono: Time::from_micros(self.epoch.elapsed().as_micros() as u64),
            wall: SystemTime::now(),
        }
    }

    /// The instant `t` stands for.
    fn instant(&self, t: Time) -> tokio::time::Instant {
        (self.epoch + std::time::Duration::from_micros(t.as_micros())).into()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Why the state task stopped, once it has: set once, before its request channel closes.
pub type Down = Arc<OnceLock<String>>;

/// Requests handled as one planner batch at most (see [`State::step_many`]).
const BATCH: usize = 256;

/// How long one batch may run before a read waiting behind it gets its turn; longer after
/// a long timer turn (see [`run`]).
const BATCH_TIME: Duration = Duration::from_millis(5);

/// How long a due timer yields to overdue batches at most: under a flood of agents'
/// messages the planner's timers (its slices and order releases, lease expiries,
/// housekeeping) still get a turn this often.
const TIMER_PATIENCE: Duration = Duration::from_millis(100);

/// How long a batch may run at most, after a long timer turn: a read waits for one turn.
const BATCH_TIME_MAX: Duration = Duration::from_millis(25);

/// Requests taken off the channel and not yet handled at most: beyond, senders wait on
/// the channel's own bound.
const BACKLOG: usize = 4096;

/// Reads handled in a row at most while other work waits: a flood of reads must not starve
/// the agents' sessions.
const READS_IN_A_ROW: u32 = 32;

/// How long the timer rests after a turn that sent fetch orders, as a multiple of that
/// turn's time: an order's completion costs the state about 1.5 times what sending the
/// order did (with 20,000 agents on a 2-core machine, 20 µs a completion in a batch against
/// 13-15 µs an order in a release turn), so the orders of a burst go out no faster than
/// their completions can be taken in. See [`Pace`].
const RELEASE_REST: f64 = 1.5;

/// Paces the fetch orders a timer turn sends (a burst's orders go out a slice per turn, see
/// `shoal_planner`'s intake): after a turn that sent orders, the timer rests
/// [`RELEASE_REST`] times that turn's length (at most [`TIMER_PATIENCE`]); batches and
/// reads run meanwhile. Sent as fast as the turns allowed, the orders of a Distribute to
/// 20,000 agents brought their completions back faster than the state could take them in,
/// and thousands of messages waited 30-100 ms behind the backlog. Paced, the p99 of their
/// wait fell from ~48 ms to ~20 ms (medians of 10 and 19 runs), and the last order goes out
/// 20-40% later (docs/BENCHMARKS.md, stop 41).
#[derive(Debug, Default)]
struct Pace {
    rest_until: Option<Instant>,
}

impl Pace {
    /// A timer turn that took `took` and ended `at` sent `orders`.
    fn sent(&mut self, orders: u64, took: Duration, at: Instant) {
        if orders > 0 {
            self.rest_until = Some(at + took.mul_f64(RELEASE_REST).min(TIMER_PATIENCE));
        }
    }

    /// Until when the timer rests, if it does at `now`.
    fn resting(&self, now: Instant) -> Option<Instant> {
        self.rest_until.filter(|t| now < *t)
    }
}

/// The state task's request queue, as senders see it: one channel for requests that may
/// overtake (see [`Request::may_overtake`]) and one for the rest, so that a read does not
/// wait for room behind thousands of agents' messages when the queue is full.
#[derive(Clone, Debug)]
pub struct Requests {
    ordered: mpsc::Sender<Queued>,
    reads: mpsc::Sender<Queued>,
}

impl Requests {
    pub async fn send(&self, request: Request) -> Result<(), mpsc::error::SendError<Request>> {
        let lane = if request.may_overtake() {
            &self.reads
        } else {
            &self.ordered
        };
        let queued = Queued {
            at: Instant::now(),
            request,
        };
        (lane.send(queued).await).map_err(|e| mpsc::error::SendError(e.0.request))
    }
}

/// A request, and when it was sent (for [`Waits`]).
#[derive(Debug)]
pub struct Queued {
    at: Instant,
    request: Request,
}

/// The state task's end of [`Requests`].
#[derive(Debug)]
pub struct Inbox {
    ordered: mpsc::Receiver<Queued>,
    reads: mpsc::Receiver<Queued>,
}

/// How long requests waited from being sent until the state task took them up
/// ([`crate::metrics::REQUEST_WAIT_SECONDS`]), by kind: the latency of an agent's session
/// message, which is one-way and so has no answer to time.
struct Waits {
    session: metrics::Histogram,
    join: metrics::Histogram,
    api: metrics::Histogram,
    health: metrics::Histogram,
}

impl Waits {
    fn new() -> Self {
        let kind = |k: &'static str| metrics::histogram!(crate::metrics::REQUEST_WAIT_SECONDS, "kind" => k);
        Self {
            session: kind("session"),
            join: kind("join"),
            api: kind("api"),
            health: kind("health"),
        }
    }

    /// Records how long `queued` waited; its request.
    fn taken(&self, queued: Queued) -> Request {
        let histogram = match &queued.request {
            Request::FromAgent { .. } | Request::SessionClosed { .. } => &self.session,
            Request::Join(..) | Request::OpenSession { .. } => &self.join,
            Request::Ping(..) => &self.health,
            _ => &self.api,
        };
        histogram.record(queued.at.elapsed());
        queued.request
    }
}

/// A request queue holding up to `capacity` requests of each kind before senders wait.
pub fn requests(capacity: usize) -> (Requests, Inbox) {
    let (ordered, ordered_rx) = mpsc::channel(capacity);
    let (reads, reads_rx) = mpsc::channel(capacity);
    let inbox = Inbox {
        ordered: ordered_rx,
        reads: reads_rx,
    };
    (Requests { ordered, reads }, inbox)
}

/// Runs `state` until every sender of `requests` is gone, or until the state panics (then
/// `down` says why).
///
/// What is queued is taken off the channel at each turn and sorted into two lanes: reads
/// (see [`Request::may_overtake`]) are handled first, one per step (up to
/// [`READS_IN_A_ROW`] while other work waits); everything else (the
/// agents' session traffic above all) in order, in batches of up to [`BATCH`] requests or
/// [`BATCH_TIME`]. Under a burst of agents' reports (a swarm of thousands finishing at
/// once) a `GetJob` waits for one batch, not for the whole queue, and a batch costs less
/// per request than single steps (one planner flush and one round of commands). Due timers
/// run between batches; a timer that stays due (the planner's slices of a big Distribute,
/// see `shoal_planner`'s intake) takes turns with the batches, alike in time, not in
/// count: the batch after a timer turn may run as long as that turn did (up to
/// [`BATCH_TIME_MAX`], and [`BATCH`] requests per [`BATCH_TIME`] of it), and a batch whose
/// first request waited past [`BATCH_TIME`] goes before the next timer turn unless the
/// timer has waited [`TIMER_PATIENCE`]. Alike in count, a Distribute to 20,000 agents
/// released its orders in turns of 25 ms against batches of 256 heartbeats (1-2 ms), and
/// 8,192 session messages queued behind them for 200-500 ms.
///
/// A timer turn that sent fetch orders is followed by a rest ([`Pace`]), so that the
/// completions those orders bring back find the state free.
pub async fn run(mut state: State, clock: Clock, mut inbox: Inbox, down: Down) {
    let waits = Waits::new();
    let mut reads: VecDeque<Queued> = VecDeque::new();
    let mut ordered: VecDeque<Queued> = VecDeque::new();
    let (mut reads_open, mut ordered_open) = (true, true);
    let mut reads_in_a_row = 0;
    let mut timer_last = false;
    // How long the last timer turn took: the next batch's allowance.
    let mut timer_took = Duration::ZERO;
    // Since when the timer has been due without its turn.
    let mut timer_due_since: Option<Instant> = None;
    let mut pace = Pace::default();
    loop {
        while reads_open {
            match inbox.reads.try_recv() {
                Ok(r) => reads.push_back(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => reads_open = false,
            }
        }
        while ordered_open && ordered.len() < BACKLOG {
            match inbox.ordered.try_recv() {
                Ok(r) => ordered.push_back(r),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => ordered_open = false,
            }
        }
        let due = state.poll_timeout();
        let resting = pace.resting(Instant::now());
        let timer_is_due = clock.now().mono >= due && resting.is_none();
        let others_wait = !ordered.is_empty() || timer_is_due;
        if !others_wait || reads.is_empty() {
            reads_in_a_row = 0;
        }
        let read = (reads_in_a_row < READS_IN_A_ROW).then(|| reads.pop_front());
        // A timer that stays due (the planner's next slice of a big burst) and a batch
        // waiting take turns, unless the batch's first request has waited past
        // [`BATCH_TIME`]: then the agents' messages go first (their wait is the session
        // latency; the timer's work, planning and releasing orders, waits in the planner).
        // A timer that waited past [`TIMER_PATIENCE`] takes its turn even so.
        let overdue = (ordered.front()).is_some_and(|q| q.at.elapsed() >= BATCH_TIME);
        timer_due_since = timer_is_due.then(|| timer_due_since.unwrap_or_else(Instant::now));
        let impatient = timer_due_since.is_some_and(|t| t.elapsed() >= TIMER_PATIENCE);
        let timer_due =
            timer_is_due && (ordered.is_empty() || (!timer_last && (!overdue || impatient)));
        let stepped = if let Some(queued) = read.flatten() {
            reads_in_a_row += 1;
            let request = waits.taken(queued);
            std::panic::catch_unwind(AssertUnwindSafe(|| state.step(request, clock.now())))
        } else if timer_due {
            reads_in_a_row = 0;
            timer_last = true;
            let started = Instant::now();
            let sent = state.orders_sent();
            let stepped =
                std::panic::catch_unwind(AssertUnwindSafe(|| state.handle_timeout(clock.now())));
            timer_took = started.elapsed();
            timer_due_since = None;
            if stepped.is_ok() {
                pace.sent(state.orders_sent() - sent, timer_took, Instant::now());
            }
            stepped
        } else if !ordered.is_empty() {
            reads_in_a_row = 0;
            timer_last = false;
            let started = Instant::now();
            let allowance = (std::mem::take(&mut timer_took)).clamp(BATCH_TIME, BATCH_TIME_MAX);
            let count = BATCH * allowance.as_micros().div_ceil(BATCH_TIME.as_micros()) as usize;
            let batch = std::iter::from_fn(|| {
                (started.elapsed() < allowance)
                    .then(|| ordered.pop_front())
                    .flatten()
            })
            .take(count)
            .map(|queued| waits.taken(queued));
            std::panic::catch_unwind(AssertUnwindSafe(|| state.step_many(batch, || clock.now())))
        } else if !reads_open && !ordered_open {
            return;
        } else {
            let timer_at = clock.instant(due);
            let wake = resting.map_or(timer_at, |r| timer_at.max(r.into()));
            tokio::select! {
                request = inbox.reads.recv(), if reads_open => {
                    match request {
                        Some(r) => reads.push_back(r),
                        None => reads_open = false,
                    }
                    Ok(())
                }
                request = inbox.ordered.recv(), if ordered_open => {
                    match request {
                        Some(r) => ordered.push_back(r),
                        None => ordered_open = false,
                    }
                    Ok(())
                }
                // The timer's turn is taken at the top of the loop, like any other.
                () = tokio::time::sleep_until(wake) => Ok(()),
            }
        };
        if let Err(panic) = stepped {
            let why = format!("the state task panicked: {}", panic_message(&*panic));
            tracing::error!("{why}");
            let _ = down.set(why);
            // The state and the channel are dropped here, in that order: callers waiting on
            // a reply find `down` set. Requests taken off the channel go with the state.
            drop(state);
            drop(reads);
            drop(ordered);
            drop(inbox);
            return;
        }
        // A turn at a time, so that [`StateTask::stop`] is heard between turns even under
        // a flood that never lets the loop wait.
        tokio::task::yield_now().await;
    }
}

/// The state task, on a thread of its own: see [`StateTask::spawn`].
#[derive(Debug)]
pub struct StateTask {
    stop: Option<oneshot::Sender<()>>,
    ended: oneshot::Receiver<Result<(), String>>,
}

impl StateTask {
    /// Runs `state` (see [`run`]) on a new OS thread with a runtime of its own. Every
    /// request of the coordinator passes through this one task in turn, so it must not
    /// share a worker of the gRPC runtime: there it yielded to the connections' tasks
    /// after every turn, and under a wave of 20,000 agents' completions it ran for 2-5
    /// ms in every 7 while thousands of messages waited for it.
    pub fn spawn(state: State, clock: Clock, inbox: Inbox, down: Down) -> std::io::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (end, ended) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name(STATE_THREAD.into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    runtime.block_on(async {
                        tokio::select! {
                            () = run(state, clock, inbox, down) => {}
                            _ = stopped => {}
                        }
                    });
                }));
                let _ = end.send(outcome.map_err(|panic| panic_message(&*panic)));
            })?;
        Ok(Self {
            stop: Some(stop),
            ended,
        })
    }

    /// Waits until the task has ended: `Err` says why if it panicked. Cancel safe.
    pub async fn ended(&mut self) -> Result<(), String> {
        match (&mut self.ended).await {
            Ok(outcome) => outcome,
            Err(_) => Err("the state thread ended without a word".into()),
        }
    }

    /// Drops the state where the task stands (its queued writes still land); then
    /// [`StateTask::ended`] returns.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The state thread's name, as `top -H` and `perf` show it.
pub const STATE_THREAD: &str = "shoal-state";

/// The message a panic was raised with.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a turn that sent orders rests (the planner's slices of a burst being planned
    /// send none and go back to back), as long as 1.5 of it, and never past the timers'
    /// patience.
    #[test]
    fn a_timer_turn_rests_after_sending_orders_only() {
        let mut pace = Pace::default();
        let at = Instant::now();
        pace.sent(0, Duration::from_millis(10), at);
        assert_eq!(pace.resting(at), None, "a turn that sent no order rested");
        pace.sent(256, Duration::from_millis(10), at);
        assert_eq!(pace.resting(at), Some(at + Duration::from_millis(15)));
        assert_eq!(pace.resting(at + Duration::from_millis(15)), None);
        pace.sent(256, Duration::from_secs(1), at);
        assert_eq!(pace.resting(at), Some(at + TIMER_PATIENCE));
    }
}
