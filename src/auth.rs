//! Users, their roles, and checking a client's credentials.
//!
//! A node either has no users (every client may do everything: the default
//! on a loopback address, where only local processes can reach it) or a
//! list of named users, each with a secret and a [`Role`]. The list comes
//! from a users file (see [`Users::parse`]); a secret never comes from the
//! command line, where `ps` would show it. In memory each secret is kept
//! only as its SHA-256 digest, compared in constant time, and never
//! logged or shown: [`User`]'s `Debug` leaves it out.
//!
//! Secrets must be random strings of at least [`SECRET_BYTES_MIN`] bytes
//! (say `openssl rand -hex 32`): a fast digest is the right store for a
//! random secret, not for a password a person chose.
//!
//! The front ends use the same rules: RESP's `AUTH [user] secret` and
//! `HELLO ... AUTH user secret` (a lone secret is the `default` user's, as
//! in Redis), HTTP's `Authorization: Bearer user:secret`.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Longest user name, in bytes.
pub const USER_NAME_BYTES_MAX: usize = 64;
/// Shortest secret, in bytes.
pub const SECRET_BYTES_MIN: usize = 16;
/// Longest secret, in bytes.
pub const SECRET_BYTES_MAX: usize = 256;
/// Most users in one users file.
pub const USERS_MAX: usize = 1_000;
/// Largest users file, in bytes.
pub const USERS_FILE_BYTES_MAX: usize = 1 << 20;

/// What a user may do. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read counters, list them, read metrics and the cluster view.
    Read,
    /// Also increment counters.
    Write,
    /// Also change the node or the cluster.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        match text {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One user: a name, a role, and the digest of its secret.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    digest: [u8; 32],
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Who a client is once its credentials were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub role: Role,
}

/// The node's users; empty means no authentication.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Equality of two digests in time that does not depend on where they
/// differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn invalid(line: usize, reason: impl Into<String>) -> Error {
    Error::InvalidInput {
        what: "users file",
        reason: format!("line {line}: {}", reason.into()),
    }
}

impl Users {
    /// No users: authentication off.
    pub fn none() -> Users {
        Users::default()
    }

    /// Whether clients must authenticate.
    pub fn enabled(&self) -> bool {
        !self.by_name.is_empty()
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Parses a users file: one user per line, `NAME ROLE SECRET`,
    /// separated by spaces or tabs; blank lines and lines starting with
    /// `#` are skipped. Names are 1 to [`USER_NAME_BYTES_MAX`] bytes of
    /// ASCII letters, digits, `_`, `-` and `.`; roles are `read`, `write`
    /// and `admin`; secrets are [`SECRET_BYTES_MIN`] to
    /// [`SECRET_BYTES_MAX`] bytes without spaces. A name given twice is an
    /// error. No error message ever quotes a secret.
    pub fn parse(text: &str) -> Result<Users> {
        if text.len() > USERS_FILE_BYTES_MAX {
            return Err(Error::InvalidInput {
                what: "users file",
                reason: format!("it is larger than {USERS_FILE_BYTES_MAX} bytes"),
            });
        }
        let mut by_name = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let [name, role, secret] = fields[..] else {
                return Err(invalid(
                    line,
                    format!("expected NAME ROLE SECRET, found {} field(s)", fields.len()),
                ));
            };
            validate_name(name).map_err(|reason| invalid(line, reason))?;
            let role = Role::parse(role).ok_or_else(|| {
                invalid(
                    line,
                    format!("role '{role}' is not one of read, write, admin"),
                )
            })?;
            if !(SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&secret.len()) {
                return Err(invalid(
                    line,
                    format!(
                        "the secret of user '{name}' is {} bytes; it must be {SECRET_BYTES_MIN} \
                         to {SECRET_BYTES_MAX} (a random string, say `openssl rand -hex 32`)",
                        secret.len()
                    ),
                ));
            }
            if by_name.len() >= USERS_MAX {
                return Err(invalid(line, format!("more than {USERS_MAX} users")));
            }
            let user = User {
                name: name.to_string(),
                role,
                digest: digest(secret.as_bytes()),
            };
            if by_name.insert(name.to_string(), user).is_some() {
                return Err(invalid(line, format!("user '{name}' is given twice")));
            }
        }
        Ok(Users { by_name })
    }

    /// Checks `user`'s `secret`; `None` for an unknown user or a wrong
    /// secret alike (a client cannot tell which). The secret's digest is
    /// computed and compared whatever the user, so an unknown name takes
    /// as long as a wrong secret.
    pub fn authenticate(&self, user: &[u8], secret: &[u8]) -> Option<Identity> {
        let given = digest(secret);
        let found = std::str::from_utf8(user)
            .ok()
            .and_then(|u| self.by_name.get(u));
        let expected = found.map_or([0u8; 32], |u| u.digest);
        let matches = same_digest(&given, &expected);
        match found {
            Some(u) if matches => Some(Identity {
                user: u.name.clone(),
                role: u.role,
            }),
            _ => None,
        }
    }

    /// Checks an HTTP bearer token, `user:secret`.
    pub fn authenticate_token(&self, token: &[u8]) -> Option<Identity> {
        let colon = token.iter().position(|&b| b == b':')?;
        self.authenticate(&token[..colon], &token[colon + 1..])
    }
}

fn validate_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > USER_NAME_BYTES_MAX {
        return Err(format!(
            "user name '{name}' must be 1 to {USER_NAME_BYTES_MAX} bytes"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(format!(
            "user name '{name}' may hold only ASCII letters, digits, '_', '-' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# tally users\n\
        reader  read   0123456789abcdef0123\n\
        \n\
        app\twrite  s3cret-s3cret-s3cret\n\
        default admin  default-secret-0001\n";

    // A users file gives each user its role; the right secret is
    // accepted, a wrong one or an unknown user refused alike; a bearer
    // token is `user:secret`.
    #[test]
    fn users_authenticate_with_their_own_secret_only() {
        let users = Users::parse(FILE).unwrap();
        assert!(users.enabled());
        assert_eq!(users.len(), 3);
        assert_eq!(
            users.authenticate(b"app", b"s3cret-s3cret-s3cret"),
            Some(Identity {
                user: "app".into(),
                role: Role::Write
            })
        );
        assert_eq!(users.authenticate(b"app", b"s3cret-s3cret-s3creT"), None);
        assert_eq!(users.authenticate(b"reader", b"s3cret-s3cret-s3cret"), None);
        assert_eq!(users.authenticate(b"nobody", b"s3cret-s3cret-s3cret"), None);
        assert_eq!(users.authenticate(b"\xff", b"x"), None);
        assert_eq!(
            users
                .authenticate_token(b"default:default-secret-0001")
                .map(|i| i.role),
            Some(Role::Admin)
        );
        assert_eq!(users.authenticate_token(b"default-secret-0001"), None);
        assert!(Role::Read < Role::Write && Role::Write < Role::Admin);
        assert!(!Users::none().enabled());
    }

    // Every malformed line is refused with its line number, and no error
    // ever quotes a secret.
    #[test]
    fn bad_users_files_are_refused_without_quoting_secrets() {
        let secret = "0123456789abcdef-secret";
        let cases = [
            (
                format!("app write {secret} extra"),
                "line 1: expected NAME ROLE SECRET, found 4",
            ),
            (
                format!("app writer {secret}"),
                "role 'writer' is not one of read, write, admin",
            ),
            (
                "app write short".to_string(),
                "the secret of user 'app' is 5 bytes",
            ),
            (format!("a:b write {secret}"), "may hold only ASCII letters"),
            (
                format!("# c\napp write {secret}\napp read {secret}"),
                "line 3: user 'app' is given twice",
            ),
            (
                format!("{} read {secret}", "n".repeat(65)),
                "must be 1 to 64 bytes",
            ),
        ];
        for (text, expected) in cases {
            let e = Users::parse(&text).unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} lacks {expected:?}");
            assert!(!e.contains(secret), "{e:?} quotes the secret");
            assert!(!e.contains("short"), "{e:?} quotes the secret");
        }
        let debug = format!(
            "{:?}",
            Users::parse(&format!("app write {secret}")).unwrap()
        );
        assert!(!debug.contains(secret) && debug.contains("app"), "{debug}");
    }
}
