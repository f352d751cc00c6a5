//! Exponential backoff with full jitter, for everything the agent retries: joining and
//! reconnecting to the coordinator, and redialling a source's have-stream.

use std::time::Duration;

/// First delay.
const MIN: Duration = Duration::from_millis(100);
/// Cap of the coordinator session's delays.
const SESSION_MAX: Duration = Duration::from_secs(5);

/// Delays that double from 100 ms up to a cap, each drawn from [half, all] of its step.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Up to 5 s: the coordinator session's cap.
    pub(crate) fn new() -> Self {
        Self::with_max(SESSION_MAX)
    }

    /// Doubling up to `max`.
    pub(crate) fn with_max(max: Duration) -> Self {
        Self {
            next: MIN.min(max),
            max,
        }
    }

    /// Back to the first step (the thing retried worked).
    pub(crate) fn reset(&mut self) {
        self.next = MIN.min(self.max);
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter: f64 = rand::random_range(0.5..1.0);
        cap.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::with_max(Duration::from_millis(800));
        let steps = [100, 200, 400, 800, 800, 800];
        for step in steps {
            let d = b.next_delay();
            let step = Duration::from_millis(step);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= MIN);
        let mut tiny = Backoff::with_max(Duration::from_millis(10));
        assert!(tiny.next_delay() <= Duration::from_millis(10));
    }
}
