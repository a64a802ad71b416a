//! Second factors kept in the state store: TOTP devices enrolled through a
//! flow or the CLI, and static recovery codes. The users file's own `totp`
//! secrets stay where they are (read-only input); a user's devices are
//! both.
//!
//! One document per user (`mfa:<username>`), changed by compare-and-swap,
//! so that a recovery code is good once even when two replicas see it at
//! the same moment.

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::directory::{base32_decode, base32_encode, TotpDevice, User};
use crate::session::{now_secs, Store, StoreError};

/// How many recovery codes a set has, and how long each is.
pub const RECOVERY_CODES: usize = 8;
const RECOVERY_CODE_LEN: usize = 12;

/// A user's second factors in the store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Devices {
    #[serde(default)]
    pub totp: Vec<TotpRecord>,
    /// SHA-256 (hex) of each recovery code not used yet.
    #[serde(default)]
    pub recovery: Vec<String>,
}

/// One enrolled TOTP device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TotpRecord {
    /// Unique among the user's devices; the `device_uid` on the wire is
    /// `s<id>` (the users file's are plain numbers).
    pub id: u32,
    pub name: String,
    /// Base32.
    pub secret: String,
    pub created: u64,
}

impl TotpRecord {
    pub fn device(&self) -> Option<TotpDevice> {
        Some(TotpDevice::new(
            format!("s{}", self.id),
            base32_decode(&self.secret)?,
        ))
    }
}

fn doc_name(username: &str) -> String {
    format!("mfa:{}", username.to_lowercase())
}

/// What the store keeps for `username` (nothing: no devices).
pub async fn devices(state: &Store, username: &str) -> Result<Devices, StoreError> {
    Ok(state.doc(&doc_name(username)).await?.unwrap_or_default())
}

/// Every TOTP device of `user`'s: the users file's, then the store's.
pub async fn totp_devices(state: &Store, user: &User) -> Result<Vec<TotpDevice>, StoreError> {
    let stored = devices(state, &user.username).await?;
    Ok(user
        .totp
        .iter()
        .cloned()
        .chain(stored.totp.iter().filter_map(TotpRecord::device))
        .collect())
}

/// A fresh secret of 160 bits (RFC 4226's recommendation), base32.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 20];
    rand::thread_rng().fill_bytes(&mut bytes);
    base32_encode(&bytes)
}

/// The `otpauth://` URI an authenticator app reads (from a QR code).
pub fn otpauth_uri(issuer: &str, username: &str, secret: &str) -> String {
    let encode = |s: &str| -> String {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!(
        "otpauth://totp/{}%3A{}?secret={secret}&algorithm=SHA1&digits=6&period=30&issuer={}",
        encode(issuer),
        encode(username),
        encode(issuer)
    )
}

/// Keep a new TOTP device for `username`; its record.
pub async fn add_totp(
    state: &Store,
    username: &str,
    name: &str,
    secret: &str,
) -> Result<TotpRecord, StoreError> {
    let (name, secret) = (name.to_owned(), secret.to_owned());
    state
        .update_doc(
            &doc_name(username),
            None,
            move |current: Option<Devices>| {
                let mut devices = current.unwrap_or_default();
                let id = devices.totp.iter().map(|d| d.id).max().unwrap_or(0) + 1;
                let record = TotpRecord {
                    id,
                    name: name.clone(),
                    secret: secret.clone(),
                    created: now_secs(),
                };
                devices.totp.push(record.clone());
                (Some(devices), record)
            },
        )
        .await
}

/// Remove `username`'s stored TOTP device `id` (all with `None`); how
/// many went.
pub async fn remove_totp(
    state: &Store,
    username: &str,
    id: Option<u32>,
) -> Result<usize, StoreError> {
    state
        .update_doc(
            &doc_name(username),
            None,
            move |current: Option<Devices>| {
                let Some(mut devices) = current else {
                    return (None, 0);
                };
                let before = devices.totp.len();
                devices.totp.retain(|d| id.is_some_and(|id| d.id != id));
                let removed = before - devices.totp.len();
                (Some(devices).filter(|d| !d.is_empty()), removed)
            },
        )
        .await
}

impl Devices {
    fn is_empty(&self) -> bool {
        self.totp.is_empty() && self.recovery.is_empty()
    }
}

fn digest(code: &str) -> String {
    let normal: String = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Sha256::digest(normal.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new set of recovery codes (letters and digits that cannot be
/// confused), as shown to the user once.
pub fn new_recovery_codes() -> Vec<String> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    (0..RECOVERY_CODES)
        .map(|_| {
            (0..RECOVERY_CODE_LEN)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect()
        })
        .collect()
}

/// Keep `codes` as `username`'s recovery codes, replacing any set before.
pub async fn set_recovery_codes(
    state: &Store,
    username: &str,
    codes: &[String],
) -> Result<(), StoreError> {
    let hashed: Vec<String> = codes.iter().map(|c| digest(c)).collect();
    state
        .update_doc(
            &doc_name(username),
            None,
            move |current: Option<Devices>| {
                let mut devices = current.unwrap_or_default();
                devices.recovery = hashed.clone();
                (Some(devices), ())
            },
        )
        .await
}

/// Use one of `username`'s recovery codes: whether `code` was one, unused
/// until now (it is not any more).
pub async fn use_recovery_code(
    state: &Store,
    username: &str,
    code: &str,
) -> Result<bool, StoreError> {
    let wanted = digest(code);
    state
        .update_doc(
            &doc_name(username),
            None,
            move |current: Option<Devices>| {
                let Some(mut devices) = current else {
                    return (None, false);
                };
                let before = devices.recovery.len();
                devices.recovery.retain(|c| c != &wanted);
                let used = devices.recovery.len() < before;
                (Some(devices).filter(|d| !d.is_empty()), used)
            },
        )
        .await
}
