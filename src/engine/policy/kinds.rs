//! The policy kinds that need nothing but the facts: group, user, network,
//! time window, password strength.

use std::sync::Arc;

use ipnet::IpNet;
use serde_json::Value;

use super::{Facts, Kind, Policy, Verdict};
use crate::config::Options;

pub const GROUP: Kind = Kind {
    name: "group",
    read: |options| {
        Arc::new(Group {
            groups: names(options, "groups"),
        })
    },
};

pub const USER: Kind = Kind {
    name: "user",
    read: |options| {
        Arc::new(User {
            users: names(options, "users")
                .into_iter()
                .map(|u| u.to_lowercase())
                .collect(),
        })
    },
};

/// A list of names that must not be empty.
fn names(options: &mut Options<'_, '_, '_>, key: &'static str) -> Vec<String> {
    match options.strings(key) {
        Some((items, place)) => {
            if items.is_empty() {
                options.error_at(&place, "name at least one");
            }
            items.into_iter().map(|(name, _)| name).collect()
        }
        None => {
            options.error(format!("missing `{key}`"));
            Vec::new()
        }
    }
}

/// Passes for a user in any of `groups`.
#[derive(Debug)]
pub struct Group {
    pub groups: Vec<String>,
}

impl Policy for Group {
    fn check(&self, facts: &Facts<'_>) -> Verdict {
        Verdict::of(
            facts
                .user
                .is_some_and(|u| u.groups.iter().any(|g| self.groups.contains(g))),
        )
    }
}

/// Passes for any of `users` (by username, in any case).
#[derive(Debug)]
pub struct User {
    pub users: Vec<String>,
}

impl Policy for User {
    fn check(&self, facts: &Facts<'_>) -> Verdict {
        Verdict::of(
            facts
                .user
                .is_some_and(|u| self.users.contains(&u.username.to_lowercase())),
        )
    }
}

pub const NETWORK: Kind = Kind {
    name: "network",
    read: |options| {
        let mut networks = Vec::new();
        match options.strings("cidrs") {
            Some((items, place)) => {
                if items.is_empty() {
                    options.error_at(&place, "name at least one network");
                }
                for (text, place) in items {
                    match text
                        .parse::<IpNet>()
                        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    {
                        Ok(net) => networks.push(net),
                        Err(_) => options.error_at(
                            &place,
                            format!(
                                "\"{text}\" is not a network like \"10.0.0.0/8\" or an address"
                            ),
                        ),
                    }
                }
            }
            None => options.error("missing `cidrs`"),
        }
        Arc::new(Network { networks })
    },
};

/// Passes for a client address inside any of `cidrs`.
#[derive(Debug)]
pub struct Network {
    pub networks: Vec<IpNet>,
}

impl Policy for Network {
    fn check(&self, facts: &Facts<'_>) -> Verdict {
        let ip = facts.request.ip.map(|ip| match ip {
            // An IPv4 client on a dual-stack socket.
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        });
        Verdict::of(ip.is_some_and(|ip| self.networks.iter().any(|n| n.contains(&ip))))
    }
}

pub const TIME: Kind = Kind {
    name: "time",
    read: |options| {
        const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        let mut days = [true; 7];
        if let Some((items, place)) = options.strings("days") {
            days = [false; 7];
            if items.is_empty() {
                options.error_at(&place, "name at least one day");
            }
            for (day, place) in items {
                match DAYS.iter().position(|d| day.eq_ignore_ascii_case(d)) {
                    Some(i) => days[i] = true,
                    None => options.error_at(
                        &place,
                        format!("\"{day}\" is not a day; use {}", DAYS.join(", ")),
                    ),
                }
            }
        }
        let minute = |options: &mut Options<'_, '_, '_>, key, default| match options.string(key) {
            Some((text, place)) => clock(&text).unwrap_or_else(|| {
                options.error_at(&place, "expected a time of day like \"08:30\"");
                default
            }),
            None => default,
        };
        let start = minute(options, "start", 0);
        let end = minute(options, "end", 24 * 60);
        let offset = match options.string("utc_offset") {
            Some((text, place)) => offset(&text).unwrap_or_else(|| {
                options.error_at(
                    &place,
                    "expected an offset from UTC like \"+01:00\" or \"-05:00\"",
                );
                0
            }),
            None => 0,
        };
        if start == end {
            options.error("`start` and `end` are the same time: the window would be empty");
        }
        Arc::new(Time {
            days,
            start,
            end,
            offset_minutes: offset,
        })
    },
};

/// `HH:MM` as minutes past midnight (`24:00` is the end of the day).
fn clock(text: &str) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

/// `+HH:MM` / `-HH:MM` as minutes.
fn offset(text: &str) -> Option<i64> {
    let text = text.trim();
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let minutes = i64::from(clock(rest)?);
    (minutes <= 14 * 60).then_some(sign * minutes)
}

/// Passes on `days` between `start` and `end` (local to `utc_offset`); a
/// window past midnight (`22:00`–`06:00`) belongs to the day it starts on.
#[derive(Debug)]
pub struct Time {
    /// Monday first.
    pub days: [bool; 7],
    pub start: u32,
    pub end: u32,
    pub offset_minutes: i64,
}

impl Time {
    fn open_at(&self, unix: u64) -> bool {
        let local = unix as i64 + self.offset_minutes * 60;
        let day_index = local.div_euclid(86_400);
        let minute = (local.rem_euclid(86_400) / 60) as u32;
        // 1970-01-01 was a Thursday.
        let weekday = |day: i64| (day + 3).rem_euclid(7) as usize;
        if self.start < self.end {
            self.days[weekday(day_index)] && (self.start..self.end).contains(&minute)
        } else if minute >= self.start {
            self.days[weekday(day_index)]
        } else {
            minute < self.end && self.days[weekday(day_index - 1)]
        }
    }
}

impl Policy for Time {
    fn check(&self, _facts: &Facts<'_>) -> Verdict {
        Verdict::of(self.open_at(crate::session::now_secs()))
    }
}

pub const PASSWORD: Kind = Kind {
    name: "password",
    read: |options| {
        let count = |options: &mut Options<'_, '_, '_>, key| {
            usize::try_from(options.integer(key, 0, 0)).unwrap_or(usize::MAX)
        };
        let length_min = count(options, "length_min");
        let uppercase = count(options, "amount_uppercase");
        let lowercase = count(options, "amount_lowercase");
        let digits = count(options, "amount_digits");
        let symbols = count(options, "amount_symbols");
        Arc::new(Password {
            field: options
                .string("field")
                .map_or_else(|| "password".to_owned(), |(f, _)| f),
            length_min,
            uppercase,
            lowercase,
            digits,
            symbols,
            symbol_charset: options.string("symbol_charset").map_or_else(
                || "!\\\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ".to_owned(),
                |(s, _)| s,
            ),
            error_message: options
                .string("error_message")
                .map_or_else(|| "The password is too weak.".to_owned(), |(m, _)| m),
        })
    },
};

/// Passes for a password (the prompt stage's answer `field`) with at least
/// this many characters of each class.
#[derive(Debug)]
pub struct Password {
    pub field: String,
    pub length_min: usize,
    pub uppercase: usize,
    pub lowercase: usize,
    pub digits: usize,
    pub symbols: usize,
    pub symbol_charset: String,
    pub error_message: String,
}

impl Policy for Password {
    fn check(&self, facts: &Facts<'_>) -> Verdict {
        // The answers of the stage being checked, or of earlier prompts.
        let password = facts
            .context
            .get("prompt_data")
            .and_then(|data| data.get(&self.field))
            .and_then(Value::as_str);
        let Some(password) = password else {
            return Verdict::fail(Some("Password not set in context"));
        };
        let of = |class: fn(char) -> bool| password.chars().filter(|c| class(*c)).count();
        let symbols = password
            .chars()
            .filter(|c| self.symbol_charset.contains(*c))
            .count();
        let strong = password.chars().count() >= self.length_min
            && of(char::is_uppercase) >= self.uppercase
            && of(char::is_lowercase) >= self.lowercase
            && of(|c| c.is_ascii_digit()) >= self.digits
            && symbols >= self.symbols;
        match strong {
            true => Verdict::pass(),
            false => Verdict::fail(Some(&self.error_message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_window_may_run_past_midnight() {
        let at = |day: u64, h: u64, m: u64| day * 86_400 + h * 3600 + m * 60;
        // 1970-01-05 was a Monday (day 4).
        let weekdays = Time {
            days: [true, true, true, true, true, false, false],
            start: 8 * 60,
            end: 18 * 60,
            offset_minutes: 0,
        };
        assert!(weekdays.open_at(at(4, 8, 0)));
        assert!(!weekdays.open_at(at(4, 18, 0)));
        assert!(!weekdays.open_at(at(9, 12, 0)), "a Saturday");
        let night = Time {
            days: [false, false, false, false, true, false, false],
            start: 22 * 60,
            end: 6 * 60,
            offset_minutes: 60,
        };
        // Friday 22:30 local is 21:30 UTC; Saturday 05:00 local belongs to Friday.
        assert!(night.open_at(at(8, 21, 30)));
        assert!(night.open_at(at(9, 4, 0)));
        assert!(!night.open_at(at(9, 5, 30)), "06:30 local");
        assert!(!night.open_at(at(7, 21, 30)), "a Thursday night");
        assert_eq!(clock("24:00"), Some(1440));
        assert_eq!(clock("24:01"), None);
        assert_eq!(offset("-05:30"), Some(-330));
        assert_eq!(offset("05:30"), None);
    }
}
