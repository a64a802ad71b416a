//! Reputation: a score per client address and per username, lowered by
//! each failed identification, password or code and raised by each login.
//! The scores live in the state store (every replica sees the same), and a
//! score that has not moved for a day is forgotten.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{Facts, Kind, Policy, Verdict};
use crate::session::Store;

/// A score left alone this long starts again from zero.
pub const DECAY: Duration = Duration::from_secs(24 * 3600);

/// The two subjects a login is scored as: its address, its name (as the
/// directory matches names).
fn subjects(ip: Option<IpAddr>, username: Option<&str>) -> [Option<String>; 2] {
    [
        ip.map(|ip| format!("ip:{ip}")),
        username
            .map(|u| u.trim().to_lowercase())
            .filter(|u| !u.is_empty())
            .map(|u| format!("user:{u}")),
    ]
}

/// One failure (`good` false) or one login, for the address and the name.
/// Store errors are logged: reputation is advice, not a lock.
pub async fn record(state: &Store, ip: Option<IpAddr>, username: Option<&str>, good: bool) {
    let side = if good { "up" } else { "down" };
    for name in subjects(ip, username).into_iter().flatten() {
        if let Err(error) = state.count(&format!("rep:{side}:{name}"), 1, DECAY).await {
            tracing::warn!(%error, "a reputation score could not be changed");
        }
    }
}

/// The score of one subject: logins less failures; unknown when the
/// store cannot say.
async fn score(state: &Store, name: &str) -> Option<i64> {
    let up = state.count(&format!("rep:up:{name}"), 0, DECAY).await;
    let down = state.count(&format!("rep:down:{name}"), 0, DECAY).await;
    match (up, down) {
        (Ok(up), Ok(down)) => Some(i64::from(up) - i64::from(down)),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "a reputation score could not be read");
            None
        }
    }
}

/// The scores a reputation policy weighs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scores {
    /// The client address's; `None` without an address or a store.
    pub ip: Option<i64>,
    /// The username's (or the identifier's, before it matched anyone).
    pub user: Option<i64>,
}

impl Scores {
    pub async fn fetch(state: &Store, ip: Option<IpAddr>, username: Option<&str>) -> Scores {
        let [ip, user] = subjects(ip, username);
        Scores {
            ip: match ip {
                Some(name) => score(state, &name).await,
                None => None,
            },
            user: match user {
                Some(name) => score(state, &name).await,
                None => None,
            },
        }
    }
}

pub const KIND: Kind = Kind {
    name: "reputation",
    read: |options| {
        let check_ip = options.bool("check_ip", true);
        let check_username = options.bool("check_username", true);
        if !check_ip && !check_username {
            options.error("`check_ip` and `check_username` are both false: nothing to score");
        }
        let threshold = options.signed("threshold", -5);
        Arc::new(Reputation {
            check_ip,
            check_username,
            threshold,
        })
    },
};

/// Passes when the scores checked add up to `threshold` or less: it picks
/// out bad actors, so it is bound with `negate = true` to keep them out.
#[derive(Debug)]
pub struct Reputation {
    pub check_ip: bool,
    pub check_username: bool,
    /// `threshold`, default -5.
    pub threshold: i64,
}

impl Policy for Reputation {
    fn check(&self, facts: &Facts<'_>) -> Verdict {
        // Unknown scores are no evidence of a bad actor.
        let scores = facts.reputation.unwrap_or_default();
        let mut sum = 0;
        if self.check_ip {
            sum += scores.ip.unwrap_or(0);
        }
        if self.check_username {
            sum += scores.user.unwrap_or(0);
        }
        Verdict::of(sum <= self.threshold)
    }

    fn uses_reputation(&self) -> bool {
        true
    }
}
