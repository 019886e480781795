//! The listening sockets of a front end: a plaintext one, a TLS one, or
//! both, served by one accept loop under one connection limit.

use std::io;
use std::net::SocketAddr;
#[cfg(feature = "tls")]
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

/// Where a front end listens: plaintext, TLS, or both. Connections from
/// both share the front end's connection limit and statistics.
#[derive(Debug, Default)]
pub struct Listeners {
    pub plain: Option<TcpListener>,
    #[cfg(feature = "tls")]
    pub tls: Option<(TcpListener, Arc<crate::tls::TlsServer>)>,
}

impl Listeners {
    /// One plaintext listener.
    pub fn plain(listener: TcpListener) -> Listeners {
        Listeners {
            plain: Some(listener),
            ..Listeners::default()
        }
    }

    /// The TLS listener, if there is one.
    pub fn tls_listener(&self) -> Option<&TcpListener> {
        #[cfg(feature = "tls")]
        {
            self.tls.as_ref().map(|(l, _)| l)
        }
        #[cfg(not(feature = "tls"))]
        {
            None
        }
    }

    /// The first listener's address (plaintext first), or an error if
    /// there is no listener at all.
    pub fn first_addr(&self) -> io::Result<SocketAddr> {
        self.plain
            .as_ref()
            .or(self.tls_listener())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no listener"))?
            .local_addr()
    }
}

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Plain,
    Tls,
}

/// Accepts on `listener`, or never completes if there is none.
pub async fn accept_on(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Accepts the next connection on either listener.
pub async fn accept_any(listeners: &Listeners) -> io::Result<(TcpStream, SocketAddr, Port)> {
    tokio::select! {
        a = accept_on(listeners.plain.as_ref()) => a.map(|(s, p)| (s, p, Port::Plain)),
        a = accept_on(listeners.tls_listener()) => a.map(|(s, p)| (s, p, Port::Tls)),
    }
}
