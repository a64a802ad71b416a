//! Counters and histograms for `/metrics`, in Prometheus' text format.
//!
//! Everything on the request path is a relaxed atomic add into memory laid
//! out at build time: a route's counters are found by the route's index, a
//! status by its number, a latency bucket by a short scan. Routes are named
//! by `host` + `path_prefix`, so their series survive reloads that keep them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        // Buckets are cumulative when rendered; store each observation once.
        if let Some(i) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// One route's series.
pub struct RouteMetrics {
    /// Indexed by status code (100..=599).
    statuses: Box<[AtomicU64; 600]>,
    pub latency: Histogram,
    pub upstream_errors: Counter,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        RouteMetrics {
            statuses: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            latency: Histogram::default(),
            upstream_errors: Counter::default(),
        }
    }
}

impl RouteMetrics {
    #[inline]
    pub fn observe(&self, status: u16, elapsed: Duration) {
        if let Some(counter) = self.statuses.get(status as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.observe(elapsed);
    }
}

/// Everything `/metrics` shows; lives as long as the process.
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
    /// Requests that matched no route, and flowgate's own endpoints.
    pub unrouted: Arc<RouteMetrics>,
    pub logins_succeeded: Counter,
    pub logins_failed: Counter,
    pub reloads: Counter,
    pub reload_failures: Counter,
    pub connections_accepted: Counter,
    /// Requests served on the HTTP/1.1 fast lane (`h1`).
    pub fast_lane_requests: Counter,
    /// Connections the fast lane handed to the general path.
    pub fast_lane_handoffs: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// The series of the route named `name`, created on first use; called
    /// when a gateway is built, never per request.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.entry(name.to_owned()).or_default().clone()
    }

    /// The Prometheus text exposition. `active_sessions` comes from the
    /// session store, `open_connections` from the listener.
    pub fn render(&self, active_sessions: Option<usize>, open_connections: usize) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP flowgate_build_info Build of the running flowgate.\n# TYPE flowgate_build_info gauge\n");
        let _ = writeln!(
            out,
            "flowgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        let routes: Vec<(String, Arc<RouteMetrics>)> = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            routes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let all = routes
            .iter()
            .map(|(n, m)| (n.as_str(), m.as_ref()))
            .chain([("", self.unrouted.as_ref())]);
        let all: Vec<(&str, &RouteMetrics)> = all.collect();

        out.push_str("# HELP flowgate_requests_total Requests answered, by route and status.\n# TYPE flowgate_requests_total counter\n");
        for (name, route) in &all {
            for (code, count) in route.statuses.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "flowgate_requests_total{{route=\"{}\",code=\"{code}\"}} {count}",
                        escape(name)
                    );
                }
            }
        }
        out.push_str("# HELP flowgate_request_duration_seconds Time to the response head, by route.\n# TYPE flowgate_request_duration_seconds histogram\n");
        for (name, route) in &all {
            route.latency.render(
                &mut out,
                "flowgate_request_duration_seconds",
                &format!("route=\"{}\"", escape(name)),
            );
        }
        out.push_str("# HELP flowgate_upstream_errors_total Upstream connection failures and timeouts, by route.\n# TYPE flowgate_upstream_errors_total counter\n");
        for (name, route) in &all {
            let _ = writeln!(
                out,
                "flowgate_upstream_errors_total{{route=\"{}\"}} {}",
                escape(name),
                route.upstream_errors.get()
            );
        }
        out.push_str("# HELP flowgate_logins_total Finished login flows, by result.\n# TYPE flowgate_logins_total counter\n");
        let _ = writeln!(
            out,
            "flowgate_logins_total{{result=\"succeeded\"}} {}",
            self.logins_succeeded.get()
        );
        let _ = writeln!(
            out,
            "flowgate_logins_total{{result=\"failed\"}} {}",
            self.logins_failed.get()
        );
        if let Some(active) = active_sessions {
            out.push_str("# HELP flowgate_active_sessions Authenticated sessions in the store.\n# TYPE flowgate_active_sessions gauge\n");
            let _ = writeln!(out, "flowgate_active_sessions {active}");
        }
        out.push_str("# HELP flowgate_fast_lane_requests_total Requests served on the HTTP/1.1 fast lane.\n# TYPE flowgate_fast_lane_requests_total counter\n");
        let _ = writeln!(
            out,
            "flowgate_fast_lane_requests_total {}",
            self.fast_lane_requests.get()
        );
        out.push_str("# HELP flowgate_fast_lane_handoffs_total Connections the fast lane handed to the general path.\n# TYPE flowgate_fast_lane_handoffs_total counter\n");
        let _ = writeln!(
            out,
            "flowgate_fast_lane_handoffs_total {}",
            self.fast_lane_handoffs.get()
        );
        out.push_str("# HELP flowgate_open_connections Client connections open now.\n# TYPE flowgate_open_connections gauge\n");
        let _ = writeln!(out, "flowgate_open_connections {open_connections}");
        out.push_str("# HELP flowgate_connections_total Client connections accepted.\n# TYPE flowgate_connections_total counter\n");
        let _ = writeln!(
            out,
            "flowgate_connections_total {}",
            self.connections_accepted.get()
        );
        out.push_str("# HELP flowgate_config_reloads_total Config reloads, by result.\n# TYPE flowgate_config_reloads_total counter\n");
        let _ = writeln!(
            out,
            "flowgate_config_reloads_total{{result=\"applied\"}} {}",
            self.reloads.get()
        );
        let _ = writeln!(
            out,
            "flowgate_config_reloads_total{{result=\"refused\"}} {}",
            self.reload_failures.get()
        );
        out
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let metrics = Metrics::new();
        let route = metrics.route("app.example/");
        route.observe(200, Duration::from_micros(300));
        route.observe(200, Duration::from_millis(3));
        route.observe(502, Duration::from_secs(20));
        metrics.logins_failed.inc();
        let text = metrics.render(Some(2), 5);
        assert!(
            text.contains("flowgate_requests_total{route=\"app.example/\",code=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flowgate_requests_total{route=\"app.example/\",code=\"502\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "flowgate_request_duration_seconds_bucket{route=\"app.example/\",le=\"0.0005\"} 1"
        ));
        assert!(text.contains(
            "flowgate_request_duration_seconds_bucket{route=\"app.example/\",le=\"0.005\"} 2"
        ));
        assert!(text.contains(
            "flowgate_request_duration_seconds_bucket{route=\"app.example/\",le=\"+Inf\"} 3"
        ));
        assert!(text.contains("flowgate_logins_total{result=\"failed\"} 1"));
        assert!(text.contains("flowgate_active_sessions 2"));
        assert!(text.contains("flowgate_open_connections 5"));
        // The same name gives the same series (reloads keep counting).
        metrics.route("app.example/").observe(200, Duration::ZERO);
        assert!(metrics.render(None, 0).contains("code=\"200\"} 3"));
    }
}
