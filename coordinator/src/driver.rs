//! The one loop that drives the coordinator's state: each request is a step, and the state
//! is woken exactly when its earliest timer is due (the planner's stripe updates, retries
//! and stuck checks; URL fetch timeouts; housekeeping), not on a fixed tick. The real clock
//! is read here and nowhere in the state.
//!
//! A panic in the state ends the loop: the state is dropped (its queued writes still land)
//! and the reason is recorded in [`Down`] before the request channel closes, so every
//! caller waiting on it is failed with that reason at once, and the health watchdog
//! (`crate::health`) takes the coordinator out of service and makes it exit.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use shoal_planner::Time;
use tokio::sync::mpsc;

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

/// Runs `state` until every sender of `requests` is gone, or until the state panics (then
/// `down` says why).
pub async fn run(
    mut state: State,
    clock: Clock,
    mut requests: mpsc::Receiver<Request>,
    down: Down,
) {
    loop {
        let due = clock.instant(state.poll_timeout());
        let stepped = tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                std::panic::catch_unwind(AssertUnwindSafe(|| state.step(request, clock.now())))
            }
            () = tokio::time::sleep_until(due) => {
                std::panic::catch_unwind(AssertUnwindSafe(|| state.handle_timeout(clock.now())))
            }
        };
        if let Err(panic) = stepped {
            let why = format!("the state task panicked: {}", panic_message(&*panic));
            tracing::error!("{why}");
            let _ = down.set(why);
            // The state and the channel are dropped here, in that order: callers waiting on
            // a reply find `down` set.
            drop(state);
            drop(requests);
            return;
        }
    }
}

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
