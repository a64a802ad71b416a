//! TOTP codes computed in the tests, not with flowgate's own code (RFC 6238:
//! HMAC-SHA1, RFC 4226 dynamic truncation, 6 digits, 30 s steps), and the
//! base32 a users file's `totp` holds.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 6238 TOTP with HMAC-SHA1 (RFC 4226 dynamic truncation), 6 digits.
pub fn totp_at(key: &[u8], step: u64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key).unwrap();
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let value = u32::from_be_bytes(digest[offset..offset + 4].try_into().unwrap()) & 0x7fff_ffff;
    format!("{:06}", value % 1_000_000)
}

/// The current 30-second step.
pub fn step_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}

/// The code for `key` now.
pub fn totp_now(key: &[u8]) -> String {
    totp_at(key, step_now())
}

/// Six digits that are no valid code now (nor one step either side, which
/// flowgate accepts for clock skew).
pub fn wrong_code(key: &[u8]) -> String {
    let step = step_now();
    let valid: Vec<String> = (step - 2..=step + 2).map(|s| totp_at(key, s)).collect();
    (0..)
        .map(|n: u32| format!("{:06}", n * 111_111 % 1_000_000))
        .find(|c| !valid.contains(c))
        .unwrap()
}

/// RFC 4648 base32, without padding (what a users file's `totp` holds).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut out, mut buffer, mut bits) = (String::new(), 0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
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

/// The key an `otpauth://` URI carries (its base32 `secret`), decoded.
pub fn key_of_uri(uri: &str) -> Vec<u8> {
    let url = url::Url::parse(uri).unwrap();
    assert_eq!(url.scheme(), "otpauth", "{uri}");
    let secret = url
        .query_pairs()
        .find(|(k, _)| k == "secret")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no secret in {uri}"));
    let (mut out, mut buffer, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in secret.chars() {
        let value = match c {
            'A'..='Z' => c as u32 - 'A' as u32,
            '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => panic!("not base32: {secret}"),
        };
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    out
}
