//! The agent's stop signal: one `watch` channel, set once by [`crate::Agent::shutdown`];
//! every long-running task holds a receiver.

use tokio::sync::watch;

/// A task's view of the stop signal.
pub(crate) type Stop = watch::Receiver<bool>;

/// Resolves once the agent is told to stop (or its stop signal is gone).
pub(crate) async fn stopped(stop: &mut Stop) {
    let _ = stop.wait_for(|s| *s).await;
}
