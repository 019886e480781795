//! TLS to PostgreSQL, with libpq's `sslmode` meanings on rustls.
//!
//! | `sslmode`     | encrypted              | server certificate checked          |
//! |---------------|------------------------|-------------------------------------|
//! | `disable`     | no                     | no                                  |
//! | `prefer` (default) | if the server offers | no (chain, as `verify-ca`, with `sslrootcert`) |
//! | `require`     | yes, or no connection  | no (chain, as `verify-ca`, with `sslrootcert`) |
//! | `verify-ca`   | yes                    | chains to `sslrootcert`             |
//! | `verify-full` | yes                    | chains to `sslrootcert` and names the host |
//!
//! Without verification, encryption stops a passive eavesdropper but not a
//! man in the middle; only `verify-full` proves the server is the one the
//! URL names, and is what a store across a network should use. The
//! PostgreSQL driver knows only `disable`, `prefer` and `require`: the
//! `verify-*` modes and `sslrootcert` are taken out of the URL here and the
//! driver is told `require`, while the certificate checks are done by the
//! verifier this module gives rustls.
//!
//! `sslrootcert` names a PEM file of CA certificates. It is read when the
//! store is opened (and by [`super::check_url`], so a missing file is
//! reported before anything is written); a new CA needs a restart. Client
//! certificates (`sslcert`, `sslkey`) are not supported and refused with a
//! clear error rather than ignored.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::Socket;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// Most certificates read from `sslrootcert`.
pub const ROOT_CERTIFICATES_MAX: usize = 1000;

/// What the URL asks of TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(v: &str) -> Result<Mode, StoreError> {
        Ok(match v {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(StoreError::Invalid(format!(
                    "PostgreSQL URL: sslmode={other} is not one of disable, prefer, require, \
                     verify-ca, verify-full"
                )));
            }
        })
    }

    /// What the driver is told.
    fn driver_value(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => "require",
        }
    }
}

/// The TLS settings of a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
}

/// URL parameters for client certificates, which this build refuses.
const UNSUPPORTED: [&str; 4] = ["sslcert", "sslkey", "sslpassword", "sslcrl"];

/// Takes the TLS parameters out of a `postgres://` URL: the URL for the
/// driver (with `sslmode` one it knows, without `sslrootcert`) and what
/// the URL asked for.
pub fn split_url(url: &str) -> Result<(String, PgTls), StoreError> {
    let mut tls = PgTls {
        mode: Mode::Prefer,
        root_cert: None,
    };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), tls));
    };
    let mut kept = Vec::new();
    let mut mode_given = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k)?;
        match key.as_str() {
            "sslmode" => {
                tls.mode = Mode::parse(&percent_decode(v)?)?;
                mode_given = true;
            }
            "sslrootcert" => {
                let path = percent_decode(v)?;
                if path.is_empty() || path == "system" {
                    return Err(StoreError::Invalid(
                        "PostgreSQL URL: sslrootcert must name a PEM file of CA certificates"
                            .into(),
                    ));
                }
                tls.root_cert = Some(PathBuf::from(path));
            }
            k if UNSUPPORTED.contains(&k) => {
                return Err(StoreError::Invalid(format!(
                    "PostgreSQL URL: {k} (client certificates) is not supported; \
                     authenticate with a password (sslmode=verify-full keeps it encrypted)"
                )));
            }
            _ => kept.push(pair),
        }
    }
    if mode_given {
        kept.push(match tls.mode.driver_value() {
            "disable" => "sslmode=disable",
            "prefer" => "sslmode=prefer",
            _ => "sslmode=require",
        });
    }
    if matches!(tls.mode, Mode::VerifyCa | Mode::VerifyFull) && tls.root_cert.is_none() {
        let m = if tls.mode == Mode::VerifyCa {
            "verify-ca"
        } else {
            "verify-full"
        };
        return Err(StoreError::Invalid(format!(
            "PostgreSQL URL: sslmode={m} needs sslrootcert=PATH, the PEM file of the CA that \
             signed the server's certificate"
        )));
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

fn percent_decode(s: &str) -> Result<String, StoreError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    StoreError::Invalid("PostgreSQL URL: a bad %-escape in a parameter".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| StoreError::Invalid("PostgreSQL URL: a parameter is not UTF-8".into()))
}

/// The driver's TLS connector. The driver asks for one before every
/// connection attempt, with the URL's host name, or with an empty name for
/// a Unix socket or a bare `hostaddr`; rustls cannot take an empty name, so
/// it is given a placeholder. That is safe: PostgreSQL offers no TLS on a
/// Unix socket, and a URL whose host names are needed (`verify-full`) must
/// name every host (see [`check_hosts`]).
#[derive(Clone)]
pub struct Connector(MakeRustlsConnect);

type Inner = MakeRustlsConnect;

impl MakeTlsConnect<Socket> for Connector {
    type Stream = <Inner as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <Inner as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <Inner as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        <Inner as MakeTlsConnect<Socket>>::make_tls_connect(&mut self.0, name)
    }
}

/// The stream of a connection made with a [`Connector`].
pub type Stream = <Connector as MakeTlsConnect<Socket>>::Stream;

/// With `verify-full`, every host of the URL must be named: the name is
/// what the certificate is checked against (libpq refuses the same).
pub fn check_hosts(tls: &PgTls, config: &tokio_postgres::Config) -> Result<(), StoreError> {
    use tokio_postgres::config::Host;
    if tls.mode != Mode::VerifyFull {
        return Ok(());
    }
    let hosts = config.get_hosts();
    let named = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Tcp(_)));
    if named && hosts.len() >= config.get_hostaddrs().len() {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "PostgreSQL URL: sslmode=verify-full needs a host name for every host (a Unix \
             socket or a bare hostaddr has none to check the certificate against)"
                .into(),
        ))
    }
}

impl PgTls {
    /// The connector the driver uses when it negotiates TLS (never with
    /// `disable`). Reads `sslrootcert`.
    pub fn connector(&self) -> Result<Connector, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match &self.root_cert {
            None => Arc::new(Unverified(provider.clone())),
            Some(path) => {
                let roots = read_roots(path)?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| {
                            StoreError::Invalid(format!("sslrootcert {}: {e}", path.display()))
                        })?;
                Arc::new(Chain {
                    webpki,
                    check_name: self.mode == Mode::VerifyFull,
                })
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Invalid(format!("TLS protocol versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Connector(MakeRustlsConnect::new(config)))
    }
}

fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, StoreError> {
    let bad = |what: String| StoreError::Invalid(format!("sslrootcert {}: {what}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| bad(format!("{e}")))?;
    for (i, cert) in iter.enumerate() {
        if i == ROOT_CERTIFICATES_MAX {
            return Err(bad(format!(
                "more than {ROOT_CERTIFICATES_MAX} certificates"
            )));
        }
        let cert = cert.map_err(|e| bad(format!("not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate is not a usable CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in the file".into()));
    }
    Ok(roots)
}

/// `verify-ca` and `verify-full` (and `require`/`prefer` with a root
/// certificate): the chain must lead to a root of `sslrootcert`, and with
/// `check_name` the certificate must name the host of the URL.
#[derive(Debug)]
struct Chain {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Chain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The name is checked after the chain: a name error means the
            // chain was good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: any certificate is
/// accepted (libpq does the same). The handshake's signatures are still
/// checked, so the session is bound to the certificate the server sent.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_are_taken_out_of_the_url() {
        let (url, tls) = split_url(
            "postgres://u:p@db.example:5432/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p@db.example:5432/x?application_name=a&sslmode=require"
        );
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));

        let (url, tls) = split_url("postgres://u@h/x").unwrap();
        assert_eq!((url.as_str(), tls.mode), ("postgres://u@h/x", Mode::Prefer));
        let (url, _) = split_url("postgres://u@h/x?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://u@h/x?sslmode=disable");
    }

    #[test]
    fn what_cannot_work_is_refused_with_its_reason() {
        let e = split_url("postgres://u@h/x?sslmode=verify-full")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = split_url("postgres://u@h/x?sslmode=sometimes")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=sometimes"), "{e}");
        let e = split_url("postgres://u@h/x?sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslcert") && e.contains("not supported"), "{e}");
    }
}
