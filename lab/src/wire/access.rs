//! How the tools reach a secured cluster: TLS that trusts the cluster's CA,
//! and a user's credentials (`AUTH user secret` on RESP, `Authorization:
//! Bearer user:secret` on HTTP). [`Access::open`] is plaintext without
//! credentials, what a default cluster needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

/// A connected stream, plaintext or TLS.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A connected blocking stream, plaintext or TLS.
pub trait BlockingStream: Read + Write + Send {}
impl<T: Read + Write + Send> BlockingStream for T {}

/// A user's name and secret.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub secret: String,
}

/// Never prints the secret.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// TLS and credentials for the tools' clients.
#[derive(Clone, Default)]
pub struct Access {
    /// `Some`: connect with TLS, trusting this configuration's roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub credentials: Option<Credentials>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl Access {
    /// Plaintext, no credentials.
    pub fn open() -> Access {
        Access::default()
    }

    /// TLS trusting the CA certificates in `ca` (PEM), and `user` with the
    /// secret a tally users file gives it.
    pub fn from_files(ca: &Path, users_file: &Path, user: &str) -> anyhow::Result<Access> {
        let secret = secret_of(users_file, user)?;
        Ok(Access {
            tls: Some(client_config(ca)?),
            credentials: Some(Credentials {
                user: user.to_string(),
                secret,
            }),
        })
    }

    /// Whether clients connect with TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `user:secret`, the HTTP bearer token, if there are credentials.
    pub fn bearer(&self) -> Option<String> {
        self.credentials
            .as_ref()
            .map(|c| format!("{}:{}", c.user, c.secret))
    }

    /// Connects to `addr`, with the TLS handshake if TLS is on.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<Pin<Box<dyn AsyncStream>>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::pin(tcp)),
            Some(config) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector.connect(server_name(addr), tcp).await?;
                Ok(Box::pin(tls))
            }
        }
    }

    /// Connects to `addr` blocking, reads and writes bounded by `timeout`.
    pub fn connect_blocking(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<Box<dyn BlockingStream>> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(config) => {
                let conn = rustls::ClientConnection::new(config.clone(), server_name(addr))
                    .map_err(std::io::Error::other)?;
                Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
            }
        }
    }
}

/// The name the certificate is checked against: the address's IP.
fn server_name(addr: SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// A client configuration trusting the certificates of the PEM file `ca`.
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = tally::tls::root_store(ca, "CA file")?;
    let config = rustls::ClientConfig::builder_with_provider(tally::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The secret of `user` in a tally users file (`NAME ROLE SECRET` lines).
pub fn secret_of(users_file: &Path, user: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(users_file)
        .with_context(|| format!("reading {}", users_file.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(user)).then(|| words.nth(1).map(str::to_string))?
        })
        .with_context(|| format!("{} names no user {user}", users_file.display()))
}
