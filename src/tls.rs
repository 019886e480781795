//! TLS for the front ends: the RESP TLS port and HTTPS share one
//! certificate, one key and, for mutual TLS, one CA that client
//! certificates must chain to.
//!
//! The files are read when the node starts and again on [`TlsServer::reload`]
//! (the binary calls it on SIGHUP). A reload builds a whole new rustls
//! configuration first and swaps it in only if every file read and checked;
//! a failed reload leaves the configuration in use untouched. A connection
//! keeps the configuration it was accepted with: reloading never drops or
//! renegotiates a connection, and new connections get the new certificate.
//!
//! rustls with the ring provider, chosen explicitly rather than through
//! the process default, so that another crate in the same process enabling
//! a second provider cannot change what this server offers. TLS 1.2 and 1.3
//! only; rustls offers nothing older.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

pub use crate::config::TlsFiles;

pub use tokio_rustls::server::TlsStream;

/// Most certificates read from one PEM file (a chain, or a CA bundle).
pub const PEM_CERTIFICATES_MAX: usize = 1000;

/// Why a TLS configuration could not be built. The message names the file
/// and what is wrong with it, never the file's contents.
#[derive(Debug)]
pub struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The TLS side of the front ends: a current rustls configuration, swapped
/// whole on reload. Cheap to share (`Arc`); [`TlsServer::acceptor`] is
/// called per connection.
pub struct TlsServer {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads the files and builds the configuration.
    pub fn load(files: TlsFiles) -> Result<TlsServer, TlsError> {
        let config = build(&files)?;
        Ok(TlsServer {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The files this server reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again and, if they make a valid configuration,
    /// serves it to connections accepted from now on. On error the current
    /// configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.files)?;
        *self.current.write() = Arc::new(config);
        Ok(())
    }

    /// An acceptor with the configuration current now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }

    /// The server side of the handshake on `stream`, bounded by `timeout`
    /// (a client that connects and sends nothing must not hold a slot).
    pub async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
    ) -> io::Result<TlsStream<TcpStream>> {
        match tokio::time::timeout(timeout, self.acceptor().accept(stream)).await {
            Ok(accepted) => accepted,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake not completed within {} ms (frame_timeout)",
                    timeout.as_millis()
                ),
            )),
        }
    }
}

/// The provider every configuration here is built with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let chain = read_certificates(&files.cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        TlsError(format!(
            "--tls-key {}: {}",
            files.key.display(),
            pem_error(&e, "a private key")
        ))
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = root_store(ca, "--tls-client-ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError(format!("--tls-client-ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError(format!(
            "--tls-cert {} and --tls-key {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    // HTTPS clients may offer HTTP/2; this server speaks HTTP/1.1, and
    // RESP clients offer nothing.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Every certificate in a PEM file (at most [`PEM_CERTIFICATES_MAX`]);
/// an error if there is none.
pub fn read_certificates(
    path: &Path,
    flag: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| {
        TlsError(format!(
            "{flag} {}: {}",
            path.display(),
            pem_error(&e, "certificates")
        ))
    })?;
    let mut out = Vec::new();
    for cert in iter {
        let cert = cert.map_err(|e| {
            TlsError(format!(
                "{flag} {}: {}",
                path.display(),
                pem_error(&e, "certificates")
            ))
        })?;
        if out.len() == PEM_CERTIFICATES_MAX {
            return Err(TlsError(format!(
                "{flag} {}: more than {PEM_CERTIFICATES_MAX} certificates",
                path.display()
            )));
        }
        out.push(cert);
    }
    if out.is_empty() {
        return Err(TlsError(format!(
            "{flag} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        )));
    }
    Ok(out)
}

/// The certificates of a CA file as trust anchors.
pub fn root_store(path: &Path, flag: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path, flag)? {
        roots.add(cert).map_err(|e| {
            TlsError(format!(
                "{flag} {}: a certificate is not a usable CA: {e}",
                path.display()
            ))
        })?;
    }
    Ok(roots)
}

fn pem_error(e: &rustls_pki_types::pem::Error, what: &str) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::Io(io) => format!("cannot read it: {io}"),
        E::NoItemsFound => format!("no {what} in PEM form in the file"),
        other => format!("not valid PEM: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let files = TlsFiles {
            cert: missing.clone(),
            key: empty.clone(),
            client_ca: None,
        };
        let e = TlsServer::load(files).unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert "), "{e}");
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let e = read_certificates(&empty, "--tls-client-ca")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tls-client-ca") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
