//! A real `redis-server`, started by the test on a loopback port, with its
//! append-only file in a folder of the test's (so a restart keeps what was
//! written), stopped on drop. Also: one speaking only TLS, a replica of
//! another, and a Redis Sentinel watching a master.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// What else it is started with: TLS, `--replicaof`.
    extra: Vec<String>,
    scheme: &'static str,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// `None` (loudly) when redis-server is missing, unless CI demands it.
    pub fn start(dir: &Path) -> Option<Redis> {
        Self::start_with(dir, Vec::new(), "redis")
    }

    /// Speaking only TLS (`rediss://`), with the certificate and key
    /// `{stem}.pem` and `{stem}.key` of `dir`; clients are not asked for one.
    pub fn start_tls(dir: &Path, stem: &str, ca: &Path) -> Option<Redis> {
        let file = |ext: &str| dir.join(format!("{stem}.{ext}")).display().to_string();
        let extra = vec![
            "--tls-cert-file".to_owned(),
            file("pem"),
            "--tls-key-file".to_owned(),
            file("key"),
            "--tls-ca-cert-file".to_owned(),
            ca.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        Self::start_with(dir, extra, "rediss")
    }

    /// A replica of `master` (plain TCP), its link up before this returns.
    pub fn start_replica(dir: &Path, master: &Redis) -> Option<Redis> {
        let extra = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port.to_string(),
        ];
        let replica = Self::start_with(dir, extra, "redis")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica.connection())
                .unwrap();
            if info.contains("master_link_status:up") {
                return Some(replica);
            }
            assert!(
                Instant::now() < deadline,
                "the replica never synced:\n{info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_with(dir: &Path, extra: Vec<String>, scheme: &'static str) -> Option<Redis> {
        if !super::require_program("redis-server") {
            return None;
        }
        let port = free_port();
        // A folder of its own: a master and its replica side by side
        // would share one append-only file.
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Redis {
            child: None,
            port,
            dir,
            extra,
            scheme,
        };
        redis.run();
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}/0", self.scheme, self.port)
    }

    /// A connection of the test's own (plain TCP servers only).
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    fn run(&mut self) {
        let port = self.port.to_string();
        let ports: &[&str] = match self.scheme {
            "rediss" => &["--port", "0", "--tls-port", &port],
            _ => &["--port", &port],
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and files.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Sentinel watching one master, alone (quorum 1), quick to call
/// it down (1 s) and to fail over.
pub struct Sentinel {
    child: Child,
    pub port: u16,
}

impl Sentinel {
    pub fn start(dir: &Path, master: &Redis, name: &str) -> Option<Sentinel> {
        if !super::require_program("redis-server") {
            return None;
        }
        let port = free_port();
        // The sentinel rewrites its config file as it learns.
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\n\
                 sentinel monitor {name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 3000\n",
                master.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let sentinel = Sentinel { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while sentinel.master_port(name).is_none() {
            assert!(Instant::now() < deadline, "the sentinel did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(sentinel)
    }

    /// Wait until the sentinel knows a replica of `name` (it asks the
    /// master), which it needs to fail over.
    pub fn wait_for_replica(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let replicas: Option<Vec<redis::Value>> = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|mut con| {
                    redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg(name)
                        .query(&mut con)
                })
                .ok();
            if replicas.is_some_and(|r| !r.is_empty()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel never saw a replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self, name: &str) -> Option<u16> {
        let mut con = redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(name)
            .query(&mut con)
            .ok()?;
        addr?.1.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
