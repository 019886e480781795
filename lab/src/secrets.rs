//! The secrets of a secured local cluster (`tally cluster --secure`): a
//! private CA, one server certificate for the nodes and one for HAProxy's
//! HTTPS frontend (both for `localhost` and `127.0.0.1`), and a users file
//! with a random secret per user. Made once in `DIR/secrets` (mode 0700)
//! and reused at later starts, so clients configured once keep working.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::pki::{Ca, write_file};

/// The directory under the cluster's directory.
pub const SECRETS_DIR: &str = "secrets";
/// Random bytes in each generated secret (shown as hex).
pub const SECRET_BYTES: usize = 24;

/// The users a secured cluster is made with, and their roles: `app` for
/// services and the fault test, `reader` for dashboards, `admin` for
/// operators, `healthcheck` for HAProxy's authenticated RESP check.
pub const USERS: [(&str, &str); 4] = [
    ("admin", "admin"),
    ("app", "write"),
    ("reader", "read"),
    ("healthcheck", "read"),
];

/// Where the files are.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub dir: PathBuf,
}

impl Secrets {
    /// The CA certificate clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    /// HAProxy's certificate and key in one file, as its `crt` wants.
    pub fn haproxy_pem(&self) -> PathBuf {
        self.dir.join("haproxy.pem")
    }
    /// The tally users file (`NAME ROLE SECRET`, mode 0600).
    pub fn users(&self) -> PathBuf {
        self.dir.join("users")
    }

    /// The secret of `user`.
    pub fn secret(&self, user: &str) -> anyhow::Result<String> {
        crate::wire::access::secret_of(&self.users(), user)
    }

    /// Client access as `user`: TLS trusting the CA, and the credentials.
    pub fn access(&self, user: &str) -> anyhow::Result<crate::wire::access::Access> {
        crate::wire::access::Access::from_files(&self.ca(), &self.users(), user)
    }

    /// The secrets in `base_dir`, made if missing. Files already there are
    /// kept; a partial set (an interrupted first start) is made anew.
    pub fn prepare(base_dir: &Path) -> anyhow::Result<Secrets> {
        let dir = base_dir.join(SECRETS_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", dir.display()))?;
        let secrets = Secrets { dir };
        let all = [
            secrets.ca(),
            secrets.node_cert(),
            secrets.node_key(),
            secrets.haproxy_pem(),
            secrets.users(),
        ];
        if all.iter().all(|p| p.is_file()) {
            return Ok(secrets);
        }
        let ca = Ca::new("tally local cluster CA")?;
        ca.write_cert(&secrets.ca())?;
        let names = ["localhost", "127.0.0.1"];
        ca.server(&names)?.write(&secrets.dir, "node")?;
        let lb = ca.server(&names)?;
        write_file(
            &secrets.haproxy_pem(),
            format!("{}{}", lb.cert_pem, lb.key_pem).as_bytes(),
            0o600,
        )?;
        let mut users = String::from(
            "# Made by `tally cluster --secure`: NAME ROLE SECRET. Give a client its\n\
             # user and secret (RESP: AUTH NAME SECRET; HTTP: Bearer NAME:SECRET).\n",
        );
        for (name, role) in USERS {
            users.push_str(&format!("{name} {role} {}\n", random_secret()?));
        }
        write_file(&secrets.users(), users.as_bytes(), 0o600)?;
        Ok(secrets)
    }
}

/// A new random secret from the kernel's random source, as hex.
pub fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; SECRET_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
