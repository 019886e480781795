//! Runs a node with its front ends: the lifecycle of `tally serve`.
//!
//! Order matters. Recovery runs to completion before any listener is bound,
//! so nothing can reach a node that has not recovered. On SIGTERM or SIGINT
//! the listeners stop accepting, in-flight requests finish, and only then
//! does the node make everything durable and stop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::settings::ServeSettings;
use crate::signals::Signals;
use tally::Node;
use tally::shutdown::{self, Shutdown};

/// Installs the tracing subscriber: text or JSON lines on stderr.
pub fn init_logging(json: bool, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter '{filter}'"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .with_context(|| format!("cannot listen for {what} on {a}")),
    }
}

/// Runs `tally serve` until a termination signal or `stop` fires.
pub async fn run(settings: ServeSettings, mut stop: Option<Shutdown>) -> anyhow::Result<()> {
    let config = settings.node.clone();
    let node = tokio::task::spawn_blocking(move || Node::open(config))
        .await
        .context("recovery task panicked")?
        .with_context(|| {
            format!(
                "cannot open the node in {}",
                settings.node.data_dir.display()
            )
        })?;
    let server_config = Arc::new(settings.server.clone());
    let resp = bind(server_config.resp_addr, "RESP").await?;
    let http = bind(server_config.http_addr, "HTTP").await?;
    let resp_addr = resp.as_ref().map(|l| l.local_addr()).transpose()?;
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;

    let (trigger, listener) = shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = resp {
        tasks.spawn(tally::resp::serve(
            l,
            node.clone(),
            server_config.clone(),
            listener.clone(),
        ));
    }
    if let Some(l) = http {
        tasks.spawn(tally::http::serve(
            l,
            node.clone(),
            server_config.clone(),
            listener.clone(),
        ));
    }
    let mut signals = Signals::install()?;
    let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    tracing::info!(node_id = node.node_id(), resp = %show(resp_addr), http = %show(http_addr), "ready");
    // One line on stdout for scripts and tests that start the binary.
    let ready = tally::ready::ReadyLine {
        node_id: node.node_id().to_string(),
        resp: resp_addr,
        http: http_addr,
    };
    println!("{ready}");

    let stop_fired = async {
        match stop.as_mut() {
            Some(s) => s.fired().await,
            None => std::future::pending().await,
        }
    };
    let mut fenced = node.fenced_signal();
    let fenced_fired = async {
        match fenced.as_mut() {
            Some(rx) => {
                let _ = rx.wait_for(|r| r.is_some()).await;
            }
            None => std::future::pending().await,
        }
    };
    let mut was_fenced = false;
    tokio::select! {
        _ = signals.received() => {}
        _ = stop_fired => {}
        _ = fenced_fired => {
            tracing::error!("this process was fenced by a newer one with the same node id; exiting");
            was_fenced = true;
        }
    }
    trigger.fire();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Err(e)) => tracing::warn!(error = %e, "front end ended with an error"),
            Err(e) => tracing::warn!(error = %e, "front end task failed"),
            Ok(Ok(())) => {}
        }
    }
    let shutdown = tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .context("shutdown task panicked")?;
    if was_fenced {
        anyhow::bail!("fenced: another process registered this node id in the shared store");
    }
    shutdown.context("final sync failed")?;
    Ok(())
}
