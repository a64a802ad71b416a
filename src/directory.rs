//! The user directory: who exists, their groups, and checking what they
//! present (argon2id password hashes, TOTP codes). `Directory` is the seam;
//! `FileDirectory` reads a TOML users file. The embedded engine is its only
//! caller; `identity::Identity` is what leaves it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{ConfigError, ConfigErrors, Reader, UserField};
use crate::identity::Identity;

/// The avatar of nobody in particular: a grey disc, as a data URI so that it
/// needs no route.
pub const DEFAULT_AVATAR: &str = "data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciIHdpZHRoPSI2NCIgaGVpZ2h0PSI2NCIgdmlld0JveD0iMCAwIDY0IDY0Ij48Y2lyY2xlIGN4PSIzMiIgY3k9IjMyIiByPSIzMiIgZmlsbD0iIzliYTNhZiIvPjwvc3ZnPg==";

/// One user, as read from the users file.
#[derive(Debug, Clone)]
pub struct User {
    pub pk: u64,
    pub username: String,
    pub name: String,
    pub email: String,
    pub groups: Vec<String>,
    pub superuser: bool,
    pub disabled: bool,
    password_hash: Option<String>,
    pub totp: Vec<TotpDevice>,
}

#[derive(Debug, Clone)]
pub struct TotpDevice {
    /// Position in the user's list, 1-based: the `device_uid` on the wire.
    pub uid: String,
    secret: Vec<u8>,
    digits: usize,
    period: u64,
}

impl TotpDevice {
    /// A device with the usual parameters (SHA-1, 6 digits, 30 s).
    pub fn new(uid: String, secret: Vec<u8>) -> TotpDevice {
        TotpDevice {
            uid,
            secret,
            digits: 6,
            period: 30,
        }
    }

    /// The time step `code` is right for at `unix_time`, if any, within
    /// one step of clock skew either way (authenticator apps drift).
    pub fn step_for(&self, code: &str, unix_time: u64) -> Option<TotpStep> {
        let code = code.trim();
        if code.len() != self.digits || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        [0i64, -1, 1].into_iter().find_map(|skew| {
            let step = (unix_time / self.period).checked_add_signed(skew)?;
            let right = totp_code(&self.secret, step, self.digits);
            crate::session::tokens_equal(&right, code).then(|| TotpStep {
                device: self.uid.clone(),
                step,
                period: self.period,
            })
        })
    }
}

impl User {
    pub fn identity(&self) -> Identity {
        Identity {
            username: self.username.clone(),
            name: self.name.clone(),
            email: self.email.clone(),
            groups: self.groups.clone(),
            uid: user_uid(&self.username),
            pk: self.pk,
            is_superuser: self.superuser,
            header_values: Default::default(),
        }
    }
}

/// authentik's `uid`: an opaque, stable hex id.
pub fn user_uid(username: &str) -> String {
    hex(&Sha256::digest(
        format!("flowgate-user:{username}").as_bytes(),
    ))
}

/// A UUID-shaped stable id for a group name (`users/me` wants one).
pub fn group_pk(name: &str) -> String {
    let h = hex(&Sha256::digest(format!("flowgate-group:{name}").as_bytes()));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// An initials avatar (what authentik shows for users without a picture).
pub fn avatar_for(display: &str) -> String {
    let initials: String = display
        .split(|c: char| c.is_whitespace() || c == '.' || c == '_' || c == '-')
        .filter_map(|w| w.chars().next())
        .filter(|c| c.is_alphanumeric())
        .take(2)
        .flat_map(char::to_uppercase)
        .collect();
    if initials.is_empty() {
        return DEFAULT_AVATAR.to_owned();
    }
    let hue = Sha256::digest(display.as_bytes())[0] as u32 * 360 / 256;
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"64\" height=\"64\" viewBox=\"0 0 64 64\">\
         <circle cx=\"32\" cy=\"32\" r=\"32\" fill=\"hsl({hue},45%,40%)\"/>\
         <text x=\"50%\" y=\"50%\" fill=\"#fff\" font-family=\"sans-serif\" font-size=\"26\" \
         text-anchor=\"middle\" dominant-baseline=\"central\">{}</text></svg>",
        escape_xml(&initials)
    );
    format!("data:image/svg+xml;base64,{}", STANDARD.encode(svg))
}

fn escape_xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Why a users file cannot be used: every problem in it, each with its
/// line and key (`users.toml:7: user[1].password: …`), one per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirectoryError(pub ConfigErrors);

/// Lookups and checks the engine needs. Lookups are in memory and sync;
/// checks that cost CPU on purpose (argon2) are async and run off the runtime.
#[async_trait]
pub trait Directory: Send + Sync {
    /// Find a user by any of `fields`, case-insensitively.
    fn find(&self, identifier: &str, fields: &[UserField]) -> Option<Arc<User>>;

    /// Check a password. `None` (no such user) does the same work against a
    /// dummy hash and fails, so that unknown users cost the same time as
    /// wrong passwords. Disabled users always fail.
    async fn verify_password(&self, user: Option<&User>, password: &str) -> bool;
}

/// A TOTP code that matched: the device (its uid), the time step, the
/// device's period in seconds. Only the match: that a step is used once is
/// the engine's to keep (the state store's marks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotpStep {
    pub device: String,
    pub step: u64,
    pub period: u64,
}

pub struct FileDirectory {
    users: Vec<Arc<User>>,
    by_username: HashMap<String, usize>,
    by_email: HashMap<String, usize>,
    /// Who each enabled user is now, by exact username: what a session's
    /// frozen identity is resolved to on every decision (`gate::live`).
    /// Built once per load, so each reload's identities carry fresh groups
    /// and their header values are made once per reload, not per request.
    identities: HashMap<String, Arc<Identity>>,
    dummy_hash: String,
    hashing: Arc<Semaphore>,
}

/// Password checks allowed at once: argon2 uses ~19 MiB and a core's worth of
/// time each, so a burst of logins must queue rather than exhaust the box.
fn hashing_permits() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
}

impl FileDirectory {
    pub fn load(path: &Path) -> Result<FileDirectory, DirectoryError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DirectoryError(ConfigErrors(vec![ConfigError {
                file: path.display().to_string(),
                line: None,
                key: String::new(),
                message: format!("cannot read users file: {e}"),
            }]))
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Every problem of a users file, without building the directory.
    pub fn validate(text: &str, file: &str) -> Result<(), ConfigErrors> {
        crate::config::read_toml(text, Path::new(file), read_users).map(|_| ())
    }

    pub fn parse(text: &str, file: &str) -> Result<FileDirectory, DirectoryError> {
        let users =
            crate::config::read_toml(text, Path::new(file), read_users).map_err(DirectoryError)?;
        let mut by_username = HashMap::new();
        let mut by_email = HashMap::new();
        for (i, user) in users.iter().enumerate() {
            by_username.insert(user.username.to_lowercase(), i);
            if !user.email.is_empty() {
                by_email.entry(user.email.to_lowercase()).or_insert(i);
            }
        }
        let identities = users
            .iter()
            .filter(|u| !u.disabled)
            .map(|u| (u.username.clone(), Arc::new(u.identity())))
            .collect();
        Ok(FileDirectory {
            users,
            by_username,
            by_email,
            identities,
            dummy_hash: dummy_hash(),
            hashing: Arc::new(Semaphore::new(hashing_permits())),
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The identity of user `username` as of this load; `None` for a user
    /// deleted or disabled since (their sessions end with this load).
    pub fn current(&self, username: &str) -> Option<Arc<Identity>> {
        self.identities.get(username).cloned()
    }

    /// The users whose sessions must end now that `newer` replaces this
    /// directory: enabled here, and deleted or disabled there. (Ended, not
    /// only ignored while they are gone: a name made again later is
    /// another account, and an account enabled again starts afresh.)
    pub fn ended_in(&self, newer: &FileDirectory) -> Vec<String> {
        self.users
            .iter()
            .filter(|old| !old.disabled)
            .filter(|old| {
                let now = newer
                    .by_username
                    .get(&old.username.to_lowercase())
                    .map(|&i| &newer.users[i]);
                !now.is_some_and(|now| !now.disabled && now.username == old.username)
            })
            .map(|old| old.username.clone())
            .collect()
    }

    /// The users enabled here and in `newer` whose groups differ there:
    /// what their open connections were let through for may not hold.
    pub fn regrouped_in(&self, newer: &FileDirectory) -> Vec<String> {
        self.users
            .iter()
            .filter(|old| !old.disabled)
            .filter(|old| {
                newer
                    .by_username
                    .get(&old.username.to_lowercase())
                    .map(|&i| &newer.users[i])
                    .is_some_and(|now| {
                        !now.disabled && now.username == old.username && now.groups != old.groups
                    })
            })
            .map(|old| old.username.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The `[[user]]` tables: every problem recorded, the users without one kept.
fn read_users(reader: &mut Reader<'_>, root: &dyn toml_edit::TableLike) -> Vec<Arc<User>> {
    let mut file = reader.table_section(root, String::new(), None);
    let mut users: Vec<Arc<User>> = Vec::new();
    let mut seen: HashMap<String, Option<usize>> = HashMap::new();
    for mut entry in reader.tables(&mut file, "user") {
        let before = reader.error_count();
        let username = match reader.string(&mut entry, "username") {
            Some((name, place)) if name.trim().is_empty() => {
                reader.error_at(&place, "must not be empty");
                None
            }
            Some((name, place)) => {
                if let Some(first) = seen.insert(name.to_lowercase(), place.line) {
                    let message = match first {
                        Some(line) => format!("`{name}` is already a user (line {line})"),
                        None => format!("`{name}` is already a user"),
                    };
                    reader.error_at(&place, message);
                }
                Some(name)
            }
            None => {
                let line = entry.line;
                reader.error(
                    line,
                    &format!("{}.username", entry.path),
                    "missing: every user needs one",
                );
                None
            }
        };
        let name = reader.string(&mut entry, "name").map(|(n, _)| n);
        let email = reader
            .string(&mut entry, "email")
            .map(|(e, _)| e)
            .unwrap_or_default();
        let groups = reader
            .strings(&mut entry, "groups")
            .map(|(groups, _)| groups.into_iter().map(|(g, _)| g).collect())
            .unwrap_or_default();
        let password_hash = reader
            .string(&mut entry, "password")
            .and_then(|(hash, place)| match PasswordHash::new(&hash) {
                Ok(parsed) if parsed.algorithm.as_str() == "argon2id" => Some(hash),
                Ok(parsed) => {
                    reader.error_at(
                        &place,
                        format!(
                            "hash algorithm `{}` is not accepted; use argon2id (`flowgate hash-password`)",
                            parsed.algorithm
                        ),
                    );
                    None
                }
                Err(_) => {
                    reader.error_at(
                        &place,
                        "not a PHC hash string; make one with `flowgate hash-password`",
                    );
                    None
                }
            });
        let disabled = reader.bool(&mut entry, "disabled", false);
        let superuser = reader.bool(&mut entry, "superuser", false);
        let mut totp = Vec::new();
        if let Some((secrets, _)) = reader.strings(&mut entry, "totp") {
            for (j, (secret, place)) in secrets.into_iter().enumerate() {
                match base32_decode(&secret) {
                    None => reader.error_at(&place, "not a base32 secret"),
                    Some(bytes) if bytes.len() < 10 => {
                        reader.error_at(&place, "secret too short (at least 80 bits)")
                    }
                    Some(bytes) => totp.push(TotpDevice::new((j + 1).to_string(), bytes)),
                }
            }
        }
        reader.finish(entry);
        let Some(username) = username.filter(|_| reader.error_count() == before) else {
            continue;
        };
        users.push(Arc::new(User {
            pk: users.len() as u64 + 1,
            name: name.unwrap_or_else(|| username.clone()),
            username,
            email,
            groups,
            superuser,
            disabled,
            password_hash,
            totp,
        }));
    }
    reader.finish(file);
    users
}

/// A hash of a random password with the default parameters: what unknown
/// users are checked against.
fn dummy_hash() -> String {
    hash_password(&crate::session::random_token()).unwrap_or_default()
}

/// argon2id with the crate's defaults (m=19 MiB, t=2, p=1: OWASP's minimum),
/// as a PHC string.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn check_hash(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[async_trait]
impl Directory for FileDirectory {
    fn find(&self, identifier: &str, fields: &[UserField]) -> Option<Arc<User>> {
        let key = identifier.trim().to_lowercase();
        fields.iter().find_map(|field| {
            let index = match field {
                UserField::Username => self.by_username.get(&key),
                UserField::Email => self.by_email.get(&key),
            }?;
            self.users.get(*index).cloned()
        })
    }

    async fn verify_password(&self, user: Option<&User>, password: &str) -> bool {
        let (hash, usable) =
            match user.and_then(|u| u.password_hash.as_ref().map(|h| (h, u.disabled))) {
                Some((hash, disabled)) => (hash.clone(), !disabled),
                None => (self.dummy_hash.clone(), false),
            };
        let password = password.to_owned();
        let Ok(_permit) = self.hashing.clone().acquire_owned().await else {
            return false;
        };
        let matched = tokio::task::spawn_blocking(move || check_hash(&hash, &password))
            .await
            .unwrap_or(false);
        matched && usable
    }
}

/// RFC 6238 with HMAC-SHA1 (RFC 4226 dynamic truncation).
pub fn totp_code(secret: &[u8], step: u64, digits: usize) -> String {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[digest.len() - 1] & 0x0f) as usize;
    let value = u32::from_be_bytes([
        digest[offset],
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]) & 0x7fff_ffff;
    let modulo = 10u32.pow(digits as u32);
    format!("{:0width$}", value % modulo, width = digits)
}

/// RFC 4648 base32 (the alphabet authenticator apps use), ignoring spaces,
/// case and `=` padding.
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in text.chars().filter(|c| !c.is_whitespace() && *c != '=') {
        let value = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u32 - 'A' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// RFC 4648 base32 without padding: how authenticator apps take secrets.
pub fn base32_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in bytes {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_round_trips() {
        assert_eq!(
            base32_encode(b"12345678901234567890"),
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
        );
        assert_eq!(base32_encode(b"f"), "MY");
        assert_eq!(base32_encode(b"fooba"), "MZXW6YTB");
        for len in 0..24 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base32_decode(&base32_encode(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn totp_matches_rfc6238_vectors() {
        // RFC 6238 appendix B, SHA-1 seed "12345678901234567890", 8 digits.
        let seed = b"12345678901234567890";
        assert_eq!(totp_code(seed, 59 / 30, 8), "94287082");
        assert_eq!(totp_code(seed, 1111111109 / 30, 8), "07081804");
        assert_eq!(totp_code(seed, 20000000000 / 30, 8), "65353130");
    }

    fn directory() -> FileDirectory {
        let hash = hash_password("right").unwrap();
        FileDirectory::parse(
            &format!(
                r#"
[[user]]
username = "Alice"
email = "Alice@Example.test"
groups = ["admins"]
password = "{hash}"
totp = ["GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"]

[[user]]
username = "bob"
password = "{hash}"
disabled = true
"#
            ),
            "users.toml",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn find_is_case_insensitive_and_passwords_check() {
        let dir = directory();
        let alice = dir.find("alice", &[UserField::Username]).unwrap();
        assert_eq!(alice.username, "Alice");
        assert!(dir
            .find("ALICE@example.TEST", &[UserField::Email])
            .is_some());
        assert!(dir
            .find("alice@example.test", &[UserField::Username])
            .is_none());
        assert!(dir.verify_password(Some(&alice), "right").await);
        assert!(!dir.verify_password(Some(&alice), "wrong").await);
        assert!(!dir.verify_password(None, "right").await);
        let bob = dir.find("bob", &[UserField::Username]).unwrap();
        assert!(
            !dir.verify_password(Some(&bob), "right").await,
            "disabled users never pass"
        );
    }

    #[test]
    fn totp_codes_match_their_device_and_step_with_a_step_of_skew() {
        let dir = directory();
        let alice = dir.find("alice", &[UserField::Username]).unwrap();
        let device = &alice.totp[0];
        let now = 1_800_000_000;
        let code = totp_code(b"12345678901234567890", now / 30, 6);
        assert_eq!(device.step_for("000000x", now), None);
        assert_eq!(device.step_for(&code[..5], now), None, "too short");
        let matched = device.step_for(&code, now).unwrap();
        assert_eq!((matched.step, matched.period), (now / 30, 30));
        assert_eq!(matched.device, device.uid);
        // A step late or early still matches, as the same step.
        assert_eq!(device.step_for(&code, now + 30).unwrap().step, now / 30);
        assert_eq!(device.step_for(&code, now - 30).unwrap().step, now / 30);
        assert_eq!(device.step_for(&code, now + 60), None);
    }

    #[test]
    fn bad_users_files_say_what_is_wrong() {
        let err = |text: &str| {
            FileDirectory::parse(text, "u.toml")
                .err()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            err("[[user]]\nusername = \"a\"\npassword = \"plain\"\n"),
            "u.toml:3: user[0].password: not a PHC hash string; make one with `flowgate hash-password`"
        );
        assert_eq!(
            err("[[user]]\nusername = \"a\"\nfoo = 1\n"),
            "u.toml:3: user[0].foo: unknown key; expected one of: username, name, email, \
             groups, password, disabled, superuser, totp"
        );
        assert_eq!(
            err("[[user]]\nusername = \"a\"\n[[user]]\nusername = \"A\"\n"),
            "u.toml:4: user[1].username: `A` is already a user (line 2)"
        );
        assert_eq!(
            err("[[user]]\nusername = \"a\"\ntotp = [\"!!\"]\n"),
            "u.toml:3: user[0].totp[0]: not a base32 secret"
        );
        assert_eq!(
            err("user = 3\n"),
            "u.toml:1: user: expected `[[user]]` tables, found an integer"
        );
        assert_eq!(
            err("[[user]\n").lines().count(),
            1,
            "TOML errors on one line"
        );
    }

    /// Every problem at once, each on its own line in file order; the good
    /// entries still parse (for inline tables too).
    #[test]
    fn every_problem_in_a_users_file_is_reported() {
        let text = "[[user]]\nusername = \"\"\n\n\
                    [[user]]\nusername = \"b\"\ndisabled = \"no\"\ngroups = [1]\n\n\
                    [[user]]\nname = \"nobody\"\n";
        let errors = FileDirectory::parse(text, "u.toml")
            .err()
            .unwrap()
            .to_string();
        let lines: Vec<&str> = errors.lines().collect();
        assert_eq!(
            lines,
            [
                "u.toml:2: user[0].username: must not be empty",
                "u.toml:6: user[1].disabled: expected true or false",
                "u.toml:7: user[1].groups[0]: expected a string, found an integer",
                "u.toml:9: user[2].username: missing: every user needs one",
            ]
        );
        let inline = FileDirectory::parse(
            "user = [{ username = \"a\" }, { username = \"b\" }]\n",
            "u.toml",
        )
        .unwrap();
        assert_eq!(inline.len(), 2);
    }
}
