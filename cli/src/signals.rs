//! SIGTERM and SIGINT, the one way every subcommand learns it should stop.
//!
//! Handlers are installed when a [`Signals`] is built, not when someone
//! starts waiting: a signal sent as soon as a node's ready line is read, or
//! while `tally cluster` is still starting nodes, must start a graceful
//! stop, not kill the process by the default action.

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Both termination signals, caught from the moment this is built.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers; call it inside a tokio runtime.
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// Waits for the first SIGTERM or SIGINT.
    pub async fn received(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received, stopping"),
            _ = self.int.recv() => tracing::info!("SIGINT received, stopping"),
        }
    }
}

/// [`Signals`] for a command that runs no runtime of its own (`tally
/// cluster`, `tally chaos`): the handlers live on a small current-thread
/// runtime that [`BlockingSignals::wait`] blocks on.
pub struct BlockingSignals {
    runtime: tokio::runtime::Runtime,
    signals: Signals,
}

impl BlockingSignals {
    pub fn install() -> anyhow::Result<BlockingSignals> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let signals = {
            let _guard = runtime.enter();
            Signals::install()?
        };
        Ok(BlockingSignals { runtime, signals })
    }

    /// Blocks until the first SIGTERM or SIGINT.
    pub fn wait(self) {
        let BlockingSignals {
            runtime,
            mut signals,
        } = self;
        runtime.block_on(signals.received());
    }
}
