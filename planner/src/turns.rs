//! Turns: how the coordinator's one state thread shares its time between reads (API calls
//! that may overtake), the agents' session messages (handled in order, in batches) and its
//! due timers (the planner's slices and order releases, leases, housekeeping).
//!
//! The coordinator's driver asks [`Turns::next`] what to do at each turn and runs it; the
//! simulator's model of the coordinator (`shoal-sim control`) asks the same machine, so that
//! what it predicts for a burst (how long messages wait, when the last order goes out) comes
//! from the rules the process runs, not from a copy of them. Time is passed in; nothing here
//! reads a clock.
//!
//! The rules, and what each was measured against (docs/BENCHMARKS.md, issue 17):
//!
//! - Reads first, one per turn, up to [`TurnConfig::reads_in_a_row`] while other work waits:
//!   a `GetJob` under a burst of agents' reports waits for one batch, not the whole queue.
//! - The agents' messages in batches of up to [`TurnConfig::batch`] requests or
//!   [`TurnConfig::batch_time`]: a batch costs less per request than single steps (one
//!   planner flush and one round of commands).
//! - A timer that stays due (the planner's next slice of a big Distribute) takes turns with
//!   the batches, alike in time, not in count: the batch after a timer turn may run as long
//!   as that turn did (up to [`TurnConfig::batch_time_max`], and `batch` requests per
//!   `batch_time` of it), and a batch whose first request waited past `batch_time` goes
//!   before the next timer turn unless the timer has waited [`TurnConfig::timer_patience`].
//!   Alike in count, a Distribute to 20,000 agents released its orders in turns of 25 ms
//!   against batches of 256 heartbeats (1-2 ms), and 8,192 session messages queued behind
//!   them for 200-500 ms.
//! - A timer turn that sent fetch orders is followed by a rest of
//!   [`TurnConfig::release_rest`] times its length (at most `timer_patience`), in which
//!   batches and reads run but no timer turn: an order's completion costs the state about
//!   1.5 times what sending the order did (20 µs against 13-15 with 20,000 agents on a
//!   2-core machine), so the orders of a burst go out no faster than their completions can be
//!   taken in. Sent as fast as the turns allowed, the completions of a Distribute to 20,000
//!   agents came back faster than the state could take them, and the p99 of the session
//!   messages' wait was ~48 ms; paced, ~20 ms, for a last order 20-40% later (stop 41).

use std::time::Duration;

use crate::Time;

/// The rules' constants; the default is what the coordinator runs.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    /// Requests handled as one batch at most, per `batch_time` of its allowance.
    pub batch: usize,
    /// How long one batch may run before a read waiting behind it gets its turn.
    pub batch_time: Duration,
    /// How long a batch may run at most, after a long timer turn.
    pub batch_time_max: Duration,
    /// How long a due timer yields to overdue batches at most.
    pub timer_patience: Duration,
    /// Reads handled in a row at most while other work waits: a flood of reads must not
    /// starve the agents' sessions.
    pub reads_in_a_row: u32,
    /// How long the timer rests after a turn that sent fetch orders, as a multiple of that
    /// turn's time.
    pub release_rest: f64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            batch: 256,
            batch_time: Duration::from_millis(5),
            batch_time_max: Duration::from_millis(25),
            timer_patience: Duration::from_millis(100),
            reads_in_a_row: 32,
            release_rest: 1.5,
        }
    }
}

/// What the state thread does next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Turn {
    /// Handle the first waiting read.
    Read,
    /// Run the due timers (`handle_timeout`), then report with [`Turns::timer_ran`].
    Timer,
    /// Handle waiting messages in order as one batch, while the batch has run less than
    /// `allowance` and at most `count` of them.
    Batch { allowance: Duration, count: usize },
    /// Nothing to do now: wait for a request, or until `wake` (a timer due, or a rest over).
    Idle { wake: Time },
}

/// The machine: what it remembers between turns.
#[derive(Debug, Default)]
pub struct Turns {
    config: TurnConfig,
    reads_in_a_row: u32,
    /// The last turn was the timer's.
    timer_last: bool,
    /// How long the last timer turn took: the next batch's allowance.
    timer_took: Duration,
    /// Since when the timer has been due without its turn.
    timer_due_since: Option<Time>,
    /// Until when the timer rests after a turn that sent orders.
    rest_until: Option<Time>,
}

/// What waits for the state thread when it chooses a turn.
#[derive(Clone, Copy, Debug)]
pub struct Waiting {
    /// A read waits.
    pub read: bool,
    /// How long the first of the waiting messages has waited, if any waits.
    pub oldest_message: Option<Duration>,
    /// When the state's earliest timer is due.
    pub timer_due: Time,
}

impl Turns {
    pub fn new(config: TurnConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// The next turn at `now`, given what waits.
    pub fn next(&mut self, now: Time, waiting: Waiting) -> Turn {
        let c = &self.config;
        let resting = self.resting(now);
        let timer_is_due = now >= waiting.timer_due && resting.is_none();
        let messages = waiting.oldest_message.is_some();
        if !(messages || timer_is_due) || !waiting.read {
            self.reads_in_a_row = 0;
        }
        // A timer that stays due and a batch waiting take turns, unless the batch's first
        // request has waited past `batch_time`: then the agents' messages go first (their
        // wait is the session latency; the timer's work waits in the planner). A timer that
        // waited past `timer_patience` takes its turn even so.
        let overdue = waiting.oldest_message.is_some_and(|w| w >= c.batch_time);
        self.timer_due_since = timer_is_due.then(|| self.timer_due_since.unwrap_or(now));
        let impatient =
            (self.timer_due_since).is_some_and(|t| now.saturating_since(t) >= c.timer_patience);
        let timer_due =
            timer_is_due && (!messages || (!self.timer_last && (!overdue || impatient)));
        if waiting.read && self.reads_in_a_row < c.reads_in_a_row {
            self.reads_in_a_row += 1;
            Turn::Read
        } else if timer_due {
            self.reads_in_a_row = 0;
            self.timer_last = true;
            Turn::Timer
        } else if messages {
            self.reads_in_a_row = 0;
            self.timer_last = false;
            let allowance =
                (std::mem::take(&mut self.timer_took)).clamp(c.batch_time, c.batch_time_max);
            let count = c.batch * allowance.as_micros().div_ceil(c.batch_time.as_micros()) as usize;
            Turn::Batch { allowance, count }
        } else {
            let wake = resting.map_or(waiting.timer_due, |r| waiting.timer_due.max(r));
            Turn::Idle { wake }
        }
    }

    /// The timer turn ran for `took`, ended at `end`, and sent `orders` fetch orders.
    pub fn timer_ran(&mut self, took: Duration, end: Time, orders: u64) {
        self.timer_took = took;
        self.timer_due_since = None;
        if orders > 0 {
            let rest = took
                .mul_f64(self.config.release_rest)
                .min(self.config.timer_patience);
            self.rest_until = Some(end + rest);
        }
    }

    /// Until when the timer rests, if it does at `now`.
    pub fn resting(&self, now: Time) -> Option<Time> {
        self.rest_until.filter(|t| now < *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn waiting(read: bool, oldest_ms: Option<u64>, timer_due: Time) -> Waiting {
        Waiting {
            read,
            oldest_message: oldest_ms.map(Duration::from_millis),
            timer_due,
        }
    }

    /// Only a turn that sent orders rests (the planner's slices of a burst being planned
    /// send none and go back to back), as long as 1.5 of it, and never past the timers'
    /// patience.
    #[test]
    fn a_timer_turn_rests_after_sending_orders_only() {
        let mut turns = Turns::default();
        let at = Time::from_secs(1);
        turns.timer_ran(10 * MS, at, 0);
        assert_eq!(turns.resting(at), None, "a turn that sent no order rested");
        turns.timer_ran(10 * MS, at, 256);
        assert_eq!(turns.resting(at), Some(at + 15 * MS));
        assert_eq!(turns.resting(at + 15 * MS), None);
        turns.timer_ran(Duration::from_secs(1), at, 256);
        assert_eq!(turns.resting(at), Some(at + 100 * MS));
        // While it rests, a due timer waits and the idle thread wakes at the rest's end.
        assert_eq!(
            turns.next(at, waiting(false, None, at)),
            Turn::Idle {
                wake: at + 100 * MS
            }
        );
        assert_eq!(
            turns.next(at + 100 * MS, waiting(false, None, at)),
            Turn::Timer
        );
    }

    /// A timer that stays due and fresh messages alternate; the batch after a long timer
    /// turn may run as long as it did, up to the maximum.
    #[test]
    fn a_due_timer_and_the_messages_take_turns_alike_in_time() {
        let mut turns = Turns::default();
        let now = Time::from_secs(1);
        let w = waiting(false, Some(1), now);
        assert_eq!(turns.next(now, w), Turn::Timer);
        turns.timer_ran(12 * MS, now, 0);
        assert_eq!(
            turns.next(now, w),
            Turn::Batch {
                allowance: 12 * MS,
                count: 256 * 3
            }
        );
        assert_eq!(turns.next(now, w), Turn::Timer);
        turns.timer_ran(60 * MS, now, 0);
        assert_eq!(
            turns.next(now, w),
            Turn::Batch {
                allowance: 25 * MS,
                count: 256 * 5
            }
        );
    }

    /// Messages that waited past the batch time go before the timer, until the timer has
    /// waited its patience.
    #[test]
    fn overdue_messages_go_first_until_the_timer_is_impatient() {
        let mut turns = Turns::default();
        let t0 = Time::from_secs(1);
        let w = waiting(false, Some(6), t0);
        assert!(matches!(turns.next(t0, w), Turn::Batch { .. }));
        assert!(matches!(turns.next(t0 + 50 * MS, w), Turn::Batch { .. }));
        assert_eq!(turns.next(t0 + 100 * MS, w), Turn::Timer);
    }

    /// Reads overtake, but not more than `reads_in_a_row` while others wait.
    #[test]
    fn reads_overtake_a_bounded_number_of_times() {
        let mut turns = Turns::default();
        let now = Time::from_secs(1);
        let w = waiting(true, Some(1), Time::MAX);
        for _ in 0..32 {
            assert_eq!(turns.next(now, w), Turn::Read);
        }
        assert!(matches!(turns.next(now, w), Turn::Batch { .. }));
        assert_eq!(turns.next(now, w), Turn::Read);
        // Alone, reads go one after another without bound.
        let alone = waiting(true, None, Time::MAX);
        for _ in 0..100 {
            assert_eq!(turns.next(now, alone), Turn::Read);
        }
    }
}
