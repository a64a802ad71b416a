//! Where a finished login may send the browser. `next`/`rd` values come from
//! anyone who can make a link, so only two shapes pass: a path on the same
//! host (`/app?x=1`, never `//host` or `/\host`), or an absolute http(s) URL
//! whose host is one flowgate protects or the operator listed.

use crate::config::{Config, HostPattern};

#[derive(Debug, Clone, Default)]
pub struct RedirectPolicy {
    hosts: Vec<HostPattern>,
}

impl RedirectPolicy {
    pub fn new(hosts: Vec<HostPattern>) -> RedirectPolicy {
        // A catch-all route host says nothing about where users may be sent.
        let hosts = hosts
            .into_iter()
            .filter(|h| *h != HostPattern::Any)
            .collect();
        RedirectPolicy { hosts }
    }

    pub fn from_config(config: &Config) -> RedirectPolicy {
        let mut hosts: Vec<HostPattern> = config.routes.iter().map(|r| r.host.clone()).collect();
        hosts.extend(
            config
                .session
                .allowed_redirect_hosts
                .iter()
                .map(|h| HostPattern::parse(h)),
        );
        RedirectPolicy::new(hosts)
    }

    /// `Some(target)` when it is safe to redirect to.
    pub fn check<'t>(&self, target: &'t str) -> Option<&'t str> {
        if target.is_empty() || target.len() > 4096 {
            return None;
        }
        // Browsers read `\` as `/` and skip tabs and newlines inside URLs:
        // `/\evil.example` and `/\t/evil.example` are both protocol-relative.
        if target
            .chars()
            .any(|c| c == '\\' || c.is_control() || c == ' ')
        {
            return None;
        }
        if let Some(rest) = target.strip_prefix('/') {
            return (!rest.starts_with('/')).then_some(target);
        }
        let url = url::Url::parse(target).ok()?;
        if !matches!(url.scheme(), "http" | "https")
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return None;
        }
        let host = url.host_str()?.to_ascii_lowercase();
        self.hosts
            .iter()
            .any(|h| h.matches(&host))
            .then_some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_same_host_paths_and_listed_hosts_pass() {
        let policy = RedirectPolicy::new(vec![
            HostPattern::parse("app.example"),
            HostPattern::parse("*.home.example"),
            HostPattern::Any,
        ]);
        for ok in [
            "/",
            "/a/b?c=d#e",
            "https://app.example/x",
            "http://grafana.home.example:8443/d",
        ] {
            assert_eq!(policy.check(ok), Some(ok), "{ok}");
        }
        for bad in [
            "",
            "//evil.example",
            "///evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "/\t/evil.example",
            "https://evil.example/",
            "https:evil.example",
            "http://home.example/",
            "https://app.example.evil.example/",
            "https://user:pw@app.example/",
            "javascript:alert(1)",
            "data:text/html,hi",
            "relative/path",
            "https://app.example\n.evil/",
        ] {
            assert_eq!(policy.check(bad), None, "{bad:?}");
        }
    }
}
