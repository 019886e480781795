//! Graceful shutdown: one trigger, many listeners.
//!
//! The binary fires the trigger on SIGTERM or SIGINT; each front end stops
//! accepting, lets every connection finish the request it is serving, and
//! returns; then the node makes everything durable and stops.

use tokio::sync::watch;

/// Fires the shutdown. Dropping it also counts as firing it.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Listens for shutdown. Cheap to clone: hand one to every task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Whether shutdown has been fired.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once shutdown has been fired (or the trigger dropped).
    pub async fn fired(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

/// Waits up to `timeout` for every connection task of a front end to end
/// (each finishing the request it is serving), then aborts the rest. A
/// task that panicked is logged. Shared by the RESP and HTTP front ends.
pub async fn drain(
    tasks: &mut tokio::task::JoinSet<()>,
    timeout: std::time::Duration,
    front_end: &str,
) {
    tracing::info!(
        connections = tasks.len(),
        "{front_end} front end stopping; waiting for connections to finish"
    );
    let drained = tokio::time::timeout(timeout, async {
        while let Some(ended) = tasks.join_next().await {
            if let Err(e) = ended
                && e.is_panic()
            {
                tracing::error!(error = %e, "{front_end} connection task panicked");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            timeout_s = timeout.as_secs(),
            "{front_end} connections still open after the drain timeout; closing them"
        );
        tasks.shutdown().await;
    }
    tracing::info!("{front_end} front end stopped");
}
