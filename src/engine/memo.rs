//! What the engine keeps on a browser between flows (`flow::Memo`, sealed
//! by the gateway into a cookie of its own): second factors checked on it,
//! for `last_auth_threshold`, and the identifier its user asked to be
//! remembered (`enable_remember_me`). Written when a login finishes, read
//! by the stages of later flows through `FlowRequest::memo`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::directory::TotpDevice;
use crate::flow::{FlowRequest, Memo};

/// The most second factors one browser remembers (one per user and stage).
const MAX_SECOND_FACTORS: usize = 4;

/// How long a remembered identifier stays: as long as browsers keep any
/// cookie (Chromium caps `Max-Age` at 400 days).
const IDENTIFIER_SECS: u64 = 400 * 24 * 3600;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrowserMemo {
    /// The identifier to fill in on identification stages that offer to
    /// remember it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    /// When the identifier was remembered (unix seconds).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub identifier_at: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub second_factors: Vec<SecondFactor>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A second factor `user` gave at `stage` on this browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondFactor {
    pub user: String,
    pub stage: String,
    /// The user's devices as they were (`devices_fingerprint`): adding or
    /// removing one asks again.
    pub devices: String,
    /// When it was checked (unix seconds).
    pub at: u64,
    /// When the stage's threshold ran out then: kept no longer.
    pub until: u64,
}

impl BrowserMemo {
    /// The request's memo; none, or one of another shape, is empty.
    pub fn of(request: &FlowRequest<'_>) -> BrowserMemo {
        request
            .memo
            .and_then(|value| BrowserMemo::deserialize(value).ok())
            .unwrap_or_default()
    }

    /// `user` gave a second factor at `stage` less than `threshold`
    /// seconds ago, with the devices they have now.
    pub fn second_factor_within(
        &self,
        user: &str,
        stage: &str,
        devices: &str,
        threshold: u64,
        now: u64,
    ) -> bool {
        self.second_factors.iter().any(|f| {
            f.user == user
                && f.stage == stage
                && f.devices == devices
                && f.at <= now
                && now < f.at.saturating_add(threshold).min(f.until)
        })
    }

    /// Remember `factor`, in place of what this browser had for its user
    /// and stage, dropping what ran out and the oldest beyond the limit.
    pub fn remember(&mut self, factor: SecondFactor, now: u64) {
        self.second_factors
            .retain(|f| f.until > now && !(f.user == factor.user && f.stage == factor.stage));
        self.second_factors.push(factor);
        self.second_factors.sort_by_key(|f| std::cmp::Reverse(f.at));
        self.second_factors.truncate(MAX_SECOND_FACTORS);
    }

    pub fn remember_identifier(&mut self, identifier: Option<String>, now: u64) {
        self.identifier_at = if identifier.is_some() { now } else { 0 };
        self.identifier = identifier;
    }

    /// The memo for the browser: until its last entry runs out; nothing
    /// left, a null that clears the cookie.
    pub fn sealable(&self, now: u64) -> Memo {
        let mut memo = self.clone();
        memo.second_factors.retain(|f| f.until > now);
        let identifier_until = memo
            .identifier
            .as_ref()
            .map(|_| memo.identifier_at.saturating_add(IDENTIFIER_SECS));
        let until = memo
            .second_factors
            .iter()
            .map(|f| f.until)
            .chain(identifier_until)
            .max();
        match until {
            Some(until) if until > now => Memo {
                value: serde_json::to_value(&memo).unwrap_or_default(),
                until,
            },
            _ => Memo {
                value: serde_json::Value::Null,
                until: now,
            },
        }
    }
}

/// A short digest of the ids of a user's TOTP devices and whether they
/// have recovery codes: what a remembered second factor was given with.
pub fn devices_fingerprint(totp: &[TotpDevice], recovery_codes: bool) -> String {
    let mut ids: Vec<&str> = totp.iter().map(|d| d.uid.as_str()).collect();
    ids.sort_unstable();
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.as_bytes());
        hasher.update(b"\n");
    }
    hasher.update(if recovery_codes { b"r" } else { b"-" });
    URL_SAFE_NO_PAD.encode(&hasher.finalize()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factor(user: &str, stage: &str, at: u64, until: u64) -> SecondFactor {
        SecondFactor {
            user: user.into(),
            stage: stage.into(),
            devices: "d".into(),
            at,
            until,
        }
    }

    #[test]
    fn a_second_factor_holds_for_its_user_stage_devices_and_window() {
        let mut memo = BrowserMemo::default();
        memo.remember(factor("alice", "mfa", 1000, 1600), 1000);
        assert!(memo.second_factor_within("alice", "mfa", "d", 600, 1599));
        assert!(!memo.second_factor_within("alice", "mfa", "d", 600, 1600));
        assert!(
            !memo.second_factor_within("alice", "mfa", "d", 60, 1100),
            "a threshold lowered since counts"
        );
        assert!(
            !memo.second_factor_within("alice", "mfa", "d", 6000, 1700),
            "nor past what was set"
        );
        assert!(!memo.second_factor_within("bob", "mfa", "d", 600, 1100));
        assert!(!memo.second_factor_within("alice", "other", "d", 600, 1100));
        assert!(!memo.second_factor_within("alice", "mfa", "e", 600, 1100));
        assert!(
            !memo.second_factor_within("alice", "mfa", "d", 600, 999),
            "not from the future"
        );
    }

    #[test]
    fn the_memo_keeps_few_entries_and_clears_when_empty() {
        let mut memo = BrowserMemo::default();
        for (i, user) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            memo.remember(factor(user, "mfa", 100 + i as u64, 1000), 100);
        }
        memo.remember(factor("e", "mfa", 200, 2000), 150);
        let users: Vec<&str> = memo
            .second_factors
            .iter()
            .map(|f| f.user.as_str())
            .collect();
        assert_eq!(
            users,
            ["e", "d", "c", "b"],
            "one per user and stage, newest kept"
        );
        assert_eq!(memo.sealable(500).until, 2000);
        assert_eq!(memo.sealable(2000).value, serde_json::Value::Null);
        memo.remember_identifier(Some("alice".into()), 2000);
        let sealed = memo.sealable(2000);
        assert_eq!(sealed.until, 2000 + IDENTIFIER_SECS);
        assert_eq!(
            BrowserMemo::deserialize(&sealed.value)
                .unwrap()
                .identifier
                .as_deref(),
            Some("alice")
        );
    }
}
