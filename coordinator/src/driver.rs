//! The one loop that drives the coordinator's state: each request is a step, and the state
//! is woken exactly when its earliest timer is due (the planner's stripe updates, retries
//! and stuck checks; URL fetch timeouts; housekeeping), not on a fixed tick. The real clock
//! is read here and nowhere in the state.

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

/// Runs `state` until every sender of `requests` is gone.
pub async fn run(mut state: State, clock: Clock, mut requests: mpsc::Receiver<Request>) {
    loop {
        let due = clock.instant(state.poll_timeout());
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                state.step(request, clock.now());
            }
            () = tokio::time::sleep_until(due) => state.handle_timeout(clock.now()),
        }
    }
}
