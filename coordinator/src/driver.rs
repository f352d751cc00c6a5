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
use std::time::{Instant, SystemTime};

use shoal_planner::{Time, Turn, TurnConfig, Turns, Waiting};
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

/// Requests taken off the channel and not yet handled at most: beyond, senders wait on
/// the channel's own bound.
const BACKLOG: usize = 4096;

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
/// (see [`Request::may_overtake`]) and everything else (the agents' session traffic above
/// all), handled in order, in batches. Which goes next, a read, a batch or the due timers,
/// and how long the timer rests after a turn that sent fetch orders, is
/// [`shoal_planner::Turns`]'s decision (its module says why each rule is there); this loop
/// runs what it decides, on the real clock.
pub async fn run(mut state: State, clock: Clock, mut inbox: Inbox, down: Down) {
    let waits = Waits::new();
    let mut reads: VecDeque<Queued> = VecDeque::new();
    let mut ordered: VecDeque<Queued> = VecDeque::new();
    let (mut reads_open, mut ordered_open) = (true, true);
    let mut turns = Turns::new(TurnConfig::default());
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
        let waiting = Waiting {
            read: !reads.is_empty(),
            oldest_message: ordered.front().map(|q| q.at.elapsed()),
            timer_due: state.poll_timeout(),
        };
        let stepped = match turns.next(clock.now().mono, waiting) {
            Turn::Read => match reads.pop_front() {
                Some(queued) => {
                    let request = waits.taken(queued);
                    std::panic::catch_unwind(AssertUnwindSafe(|| state.step(request, clock.now())))
                }
                // Not chosen without a read waiting; nothing to do if it were.
                None => Ok(()),
            },
            Turn::Timer => {
                let started = Instant::now();
                let sent = state.orders_sent();
                let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    state.handle_timeout(clock.now())
                }));
                let orders = if stepped.is_ok() {
                    state.orders_sent() - sent
                } else {
                    0
                };
                turns.timer_ran(started.elapsed(), clock.now().mono, orders);
                stepped
            }
            Turn::Batch { allowance, count } => {
                let started = Instant::now();
                let batch = std::iter::from_fn(|| {
                    (started.elapsed() < allowance)
                        .then(|| ordered.pop_front())
                        .flatten()
                })
                .take(count)
                .map(|queued| waits.taken(queued));
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    state.step_many(batch, || clock.now())
                }))
            }
            Turn::Idle { .. } if !reads_open && !ordered_open => return,
            Turn::Idle { wake } => {
                tokio::select! {
                    request = inbox.reads.recv(), if reads_open => {
                        match request {
                            Some(r) => reads.push_back(r),
                            None => reads_open = false,
                        }
                    }
                    request = inbox.ordered.recv(), if ordered_open => {
                        match request {
                            Some(r) => ordered.push_back(r),
                            None => ordered_open = false,
                        }
                    }
                    // The timer's turn is taken at the top of the loop, like any other.
                    () = tokio::time::sleep_until(clock.instant(wake)) => {}
                }
                Ok(())
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
