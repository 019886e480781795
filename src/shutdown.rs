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
