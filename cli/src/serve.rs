//! Runs a node with its front ends: the lifecycle of `tally serve`.
//!
//! Order matters. The listeners are bound first, so that a port in use is
//! reported before the data directory is touched, but nothing is accepted
//! until recovery has run to completion: nothing can reach a node that has
//! not recovered. A node with a shared store that cannot be reached yet
//! then serves only its readiness (503 on `/readyz`, `-LOADING` to `PING`)
//! while it registers again with back-off; the ready line is printed once
//! it has registered. On SIGTERM or SIGINT the listeners stop accepting,
//! in-flight requests finish, and only then does the node make everything
//! durable and stop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::settings::ServeSettings;
use crate::signals::Signals;
use tally::Node;
use tally::node::Registration;
use tally::shutdown::{self, Shutdown};

/// Installs the tracing subscriber: text or JSON lines on stderr.
pub fn init_logging(json: bool, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter '{filter}'"))?;
    // Colour codes only for a person at a terminal, never in a log file
    // or a journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
/// Without users, a node serves every client; on a loopback address only
/// local processes can reach it, and that stays the default. On any other
/// address serving without authentication must be asked for: an open node
/// is a decision, not an accident.
fn refuse_open_on_a_network(settings: &ServeSettings) -> anyhow::Result<()> {
    if settings.server.users.enabled() || settings.insecure_no_auth {
        return Ok(());
    }
    let server = &settings.server;
    let open: Vec<String> = [
        server.resp_addr,
        server.http_addr,
        server.resp_tls_addr,
        server.https_addr,
    ]
    .into_iter()
    .flatten()
    .filter(|a| !a.ip().is_loopback())
    .map(|a| a.to_string())
    .collect();
    if open.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {} without authentication: give --users-file (TALLY_USERS_FILE), \
         or --insecure-no-auth true (TALLY_INSECURE_NO_AUTH=true) to let every client that \
         can reach it do everything",
        open.join(" and ")
    )
}

pub async fn run(settings: ServeSettings, mut stop: Option<Shutdown>) -> anyhow::Result<()> {
    // Caught from the start: a SIGTERM while the node recovers or waits for
    // its store stops it cleanly.
    let mut signals = Signals::install()?;
    refuse_open_on_a_network(&settings)?;
    let server_config = Arc::new(settings.server.clone());
    // Bound before the data directory is touched: a port in use fails at
    // once and changes nothing. Nothing is accepted until the node opened.
    // The certificate and key are read before anything is bound or
    // written: a bad file changes nothing.
    let tls = match &server_config.tls {
        Some(files) => Some(Arc::new(
            tally::tls::TlsServer::load(files.clone()).context("TLS settings")?,
        )),
        None => None,
    };
    let resp = bind(server_config.resp_addr, "RESP").await?;
    let http = bind(server_config.http_addr, "HTTP").await?;
    let resp_tls = bind(server_config.resp_tls_addr, "RESP over TLS").await?;
    let https = bind(server_config.https_addr, "HTTPS").await?;
    let addr = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr()).transpose();
    let (resp_addr, http_addr) = (addr(&resp)?, addr(&http)?);
    let (resp_tls_addr, https_addr) = (addr(&resp_tls)?, addr(&https)?);
    let reload = spawn_reload_on_hangup(tls.clone())?;
    let mut config = settings.node.clone();
    // An address with port 0 ("any free port") is advertised as the port
    // bound, so that the cluster view and `tally status` can reach it.
    if let Some(c) = config.cluster.as_mut()
        && c.address.parse::<SocketAddr>().is_ok_and(|a| a.port() == 0)
        && let Some(bound) = http_addr.or(https_addr)
    {
        c.address = bound.to_string();
    }
    let node = tokio::task::spawn_blocking(move || Node::open_waiting_for_store(config))
        .await
        .context("recovery task panicked")?
        .with_context(|| {
            format!(
                "cannot open the node in {}",
                settings.node.data_dir.display()
            )
        })?;

    let (trigger, listener) = shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    let listeners = |plain: Option<TcpListener>, secure: Option<TcpListener>| {
        let mut l = tally::listen::Listeners {
            plain,
            ..Default::default()
        };
        l.tls = secure.zip(tls.clone());
        (l.plain.is_some() || l.tls.is_some()).then_some(l)
    };
    if let Some(l) = listeners(resp, resp_tls) {
        tasks.spawn(tally::resp::serve_on(
            l,
            node.clone(),
            server_config.clone(),
            listener.clone(),
        ));
    }
    if let Some(l) = listeners(http, https) {
        tasks.spawn(tally::http::serve_on(
            l,
            node.clone(),
            server_config.clone(),
            listener.clone(),
        ));
    }

    // A node whose store cannot be reached yet serves only its readiness
    // (503 on /readyz, -LOADING to PING) until it registers; the ready line
    // waits for that.
    let mut registration = node.registration();
    let registered = tokio::select! {
        r = registration.wait_for(|r| !matches!(r, Registration::Pending(_))) => {
            match r.map(|r| r.clone()) {
                Ok(Registration::Failed(reason)) => Err(reason),
                _ => Ok(true),
            }
        }
        _ = stop_requested(&mut signals, &mut stop) => Ok(false),
    };
    let serving = match registered {
        Ok(serving) => serving,
        Err(reason) => {
            stop_serving(trigger, tasks, node).await?;
            anyhow::bail!("registering with the shared store failed: {reason}");
        }
    };
    if !serving {
        tracing::info!("stopped before the shared store could be reached");
        return stop_serving(trigger, tasks, node).await;
    }

    let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    tracing::info!(
        node_id = node.node_id(),
        resp = %show(resp_addr),
        http = %show(http_addr),
        resp_tls = %show(resp_tls_addr),
        https = %show(https_addr),
        "ready"
    );
    // One line on stdout for scripts and tests that start the binary.
    let ready = tally::ready::ReadyLine {
        node_id: node.node_id().to_string(),
        resp: resp_addr,
        http: http_addr,
        resp_tls: resp_tls_addr,
        https: https_addr,
    };
    println!("{ready}");

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
        _ = stop_requested(&mut signals, &mut stop) => {}
        _ = fenced_fired => {
            tracing::error!("this process was fenced by a newer one with the same node id; exiting");
            was_fenced = true;
        }
    }
    reload.abort();
    let stopped = stop_serving(trigger, tasks, node).await;
    if was_fenced {
        anyhow::bail!("fenced: another process registered this node id in the shared store");
    }
    stopped
}

/// Catches SIGHUP for the life of the node (its default action would end
/// the process) and reloads the TLS certificate and key on each one. A
/// failed reload keeps the certificate in use and says why.
fn spawn_reload_on_hangup(
    tls: Option<Arc<tally::tls::TlsServer>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &tls {
                None => tracing::info!("SIGHUP received: no TLS certificate to reload"),
                Some(tls) => match tls.reload() {
                    Ok(()) => tracing::info!(
                        cert = %tls.files().cert.display(),
                        "SIGHUP received: TLS certificate and key reloaded; new connections get them"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP received: TLS reload failed; the certificate in use stays"
                    ),
                },
            }
        }
    }))
}

/// Completes at the first SIGTERM or SIGINT, or when `stop` fires.
async fn stop_requested(signals: &mut Signals, stop: &mut Option<Shutdown>) {
    match stop.as_mut() {
        Some(s) => tokio::select! {
            _ = signals.received() => {}
            _ = s.fired() => {}
        },
        None => signals.received().await,
    }
}

/// Stops the front ends, waits for the requests in flight, then shuts the
/// node down (everything durable, a final snapshot).
async fn stop_serving(
    trigger: shutdown::ShutdownTrigger,
    mut tasks: tokio::task::JoinSet<std::io::Result<()>>,
    node: Node,
) -> anyhow::Result<()> {
    trigger.fire();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Err(e)) => tracing::warn!(error = %e, "front end ended with an error"),
            Err(e) => tracing::warn!(error = %e, "front end task failed"),
            Ok(Ok(())) => {}
        }
    }
    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .context("shutdown task panicked")?
        .context("final sync failed")
}
