//! The access log: one line per request, written alike by both lanes.
//! Path only: query strings can carry tokens, and cookies and credentials
//! never appear here.

use std::net::IpAddr;
use std::time::Duration;

/// What the access log says of one request (both lanes write it).
pub(crate) struct AccessLine<'a> {
    pub client: IpAddr,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub route: Option<usize>,
    pub user: Option<&'a str>,
}

impl AccessLine<'_> {
    pub(crate) fn log(&self, elapsed: Duration) {
        tracing::info!(
            target: "flowgate::access",
            client = %self.client,
            host = %self.host,
            method = self.method,
            path = self.path,
            status = self.status,
            route = self.route,
            user = self.user.unwrap_or("-"),
            micros = elapsed.as_micros() as u64,
            "request"
        );
    }
}
