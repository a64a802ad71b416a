//! The files in `deploy/` and `config/` work as shipped: the image's example
//! config passes `check` laid out as the Dockerfile lays it out, the image's
//! HEALTHCHECK line passes on a running gate and fails without one, the
//! systemd unit's start and reload commands do what they say, and
//! `systemd-analyze verify` accepts the unit (when it is installed).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::require_program;

const SECRET: &str = "a-session-secret-of-forty-four-characters-==";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The binary, with no `FLOWGATE_*` of the test's own environment.
fn flowgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FLOWGATE_") {
            command.env_remove(name);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

fn check(config: &Path, env: &[(&str, &str)]) -> Output {
    flowgate()
        .arg("check")
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn assert_ok(output: &Output, expected: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(expected),
        "wanted {expected:?}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---- the Dockerfile, read as Docker reads it ----

/// One instruction: its keyword (upper case) and the rest of its line.
struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of the last stage (after the last `FROM`), with
/// continuation lines joined and comment lines dropped.
fn final_stage(dockerfile: &str) -> Vec<Instruction> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends inside a line");
    let mut stage = Vec::new();
    for line in joined {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage.clear();
        }
        stage.push(Instruction {
            keyword,
            args: args.trim().to_owned(),
        });
    }
    stage
}

fn instructions<'a>(stage: &'a [Instruction], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// `(source in the build context, destination in the image)` of every
/// `COPY` from the context (not `--from` another stage) in the last stage.
fn copies_from_context(stage: &[Instruction]) -> Vec<(String, String)> {
    let mut copies = Vec::new();
    for args in instructions(stage, "COPY") {
        assert!(!args.starts_with('['), "COPY in JSON form: {args}");
        let words: Vec<&str> = args.split_whitespace().collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        let (destination, sources) = paths.split_last().expect("COPY with no paths");
        assert_eq!(sources.len(), 1, "one file per COPY, to a file: {args}");
        copies.push((sources[0].to_owned(), (*destination).to_owned()));
    }
    copies
}

/// The `--config` the image runs with, from `CMD` (JSON form).
fn image_config_path(stage: &[Instruction]) -> String {
    let cmd = instructions(stage, "CMD");
    let cmd = cmd.last().expect("a CMD");
    let words: Vec<String> = serde_json::from_str(cmd).expect("CMD in JSON form");
    let at = words
        .iter()
        .position(|w| w == "--config")
        .expect("CMD names --config");
    words[at + 1].clone()
}

/// The image's `ENV NAME=value` pairs.
/// The image's `ENV` lines, its state folder (`/var/lib/flowgate`) moved
/// under `root` as `image_layout` moves `/etc/flowgate`.
fn image_env(stage: &[Instruction], root: &Path) -> Vec<(String, String)> {
    let state = root.join("var/lib/flowgate");
    std::fs::create_dir_all(&state).unwrap();
    instructions(stage, "ENV")
        .into_iter()
        .flat_map(|args| args.split_whitespace())
        .map(|pair| {
            let (name, value) = pair.split_once('=').expect("ENV NAME=value");
            let value = value
                .trim_matches('"')
                .replace("/var/lib/flowgate", state.to_str().unwrap());
            (name.to_owned(), value)
        })
        .collect()
}

/// The HEALTHCHECK's command, as Docker hands it to `/bin/sh -c`.
fn healthcheck_command(stage: &[Instruction]) -> String {
    let healthcheck = instructions(stage, "HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1, "one HEALTHCHECK in the image");
    let (_, command) = healthcheck[0]
        .split_once("CMD ")
        .expect("HEALTHCHECK … CMD command");
    let command = command.trim();
    assert!(!command.starts_with('['), "expected the shell form");
    command.to_owned()
}

/// The image's `/etc/flowgate`, rebuilt in `root` from the Dockerfile's
/// COPY lines: `root/etc/flowgate/flowgate.toml` and so on.
fn image_layout(root: &Path) -> PathBuf {
    let dockerfile = read("deploy/Dockerfile");
    let stage = final_stage(&dockerfile);
    for (source, destination) in copies_from_context(&stage) {
        if !destination.starts_with("/etc/flowgate/") {
            continue;
        }
        let target = root.join(destination.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(repo().join(&source), &target)
            .unwrap_or_else(|e| panic!("COPY {source}: {e}"));
    }
    root.join(image_config_path(&stage).trim_start_matches('/'))
}

#[test]
fn the_dockerfile_copies_files_that_exist_and_has_certificates_and_a_healthcheck() {
    let dockerfile = read("deploy/Dockerfile");
    let stage = final_stage(&dockerfile);

    let copies = copies_from_context(&stage);
    let into_etc: Vec<_> = copies
        .iter()
        .filter(|(_, destination)| destination.starts_with("/etc/flowgate/"))
        .collect();
    for (source, _) in &copies {
        assert!(
            repo().join(source).is_file(),
            "the Dockerfile copies {source}, which does not exist"
        );
    }
    let config = image_config_path(&stage);
    let shipped: Vec<&str> = into_etc
        .iter()
        .filter(|(_, d)| d == &config)
        .map(|(s, _)| s.as_str())
        .collect();
    assert_eq!(
        shipped,
        ["deploy/flowgate.toml"],
        "the image must run deploy/flowgate.toml, the config these tests check"
    );
    assert!(
        into_etc
            .iter()
            .any(|(s, d)| s == "deploy/users.toml" && d == "/etc/flowgate/users.toml"),
        "the users file goes beside the config: {into_etc:?}"
    );

    let runs = instructions(&stage, "RUN").join("\n");
    assert!(
        runs.contains("apt-get install") && runs.contains("ca-certificates"),
        "the runtime image installs ca-certificates: {runs}"
    );
    assert!(
        runs.contains("rm -rf /var/lib/apt/lists"),
        "and drops the package lists"
    );
    let healthcheck = healthcheck_command(&stage);
    assert!(healthcheck.contains("/readyz"), "{healthcheck}");

    // The ports it exposes are the ones its config listens on, and the
    // health check asks the admin one.
    let parsed = flowgate::config::from_str(
        &read("deploy/flowgate.toml"),
        &repo().join("deploy/flowgate.toml"),
        &|_| None,
    )
    .expect("deploy/flowgate.toml is valid");
    assert_eq!(parsed.server.listen, "0.0.0.0:8080".parse().unwrap());
    let admin = parsed.admin.listen.expect("the admin listener is on");
    assert_eq!(admin, "0.0.0.0:9090".parse().unwrap());
    let exposed: Vec<&str> = instructions(&stage, "EXPOSE")
        .into_iter()
        .flat_map(str::split_whitespace)
        .collect();
    for port in [parsed.server.listen.port(), admin.port()] {
        assert!(
            exposed.contains(&port.to_string().as_str()),
            "EXPOSE {port} missing: {exposed:?}"
        );
    }
    assert!(
        healthcheck.contains(&format!("/dev/tcp/127.0.0.1/{}", admin.port())),
        "the HEALTHCHECK asks the admin port: {healthcheck}"
    );

    // The build context keeps what the build reads.
    let ignore = read("deploy/Dockerfile.dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.contains(&"target"),
        "target/ stays out: {patterns:?}"
    );
    for pattern in &patterns {
        let pattern = pattern.trim_matches('/');
        for needed in copies.iter().map(|(s, _)| s.as_str()).chain([
            "src/main.rs",
            "Cargo.toml",
            "Cargo.lock",
        ]) {
            assert!(
                !(needed == pattern
                    || needed.starts_with(&format!("{pattern}/"))
                    || pattern == "*"
                    || pattern == "**"),
                "deploy/Dockerfile.dockerignore leaves {needed} out ({pattern})"
            );
        }
    }
}

#[test]
fn the_image_config_passes_check_laid_out_as_in_the_image() {
    let root = tempfile::tempdir().unwrap();
    let config = image_layout(root.path());
    assert!(config.ends_with("etc/flowgate/flowgate.toml"));
    assert_ok(&check(&config, &[]), "OK (1 route, 1 flow, 0 users)");

    // With a secret from a mounted file, as a Docker or Kubernetes secret.
    let secret = root.path().join("flowgate-session");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let secret = secret.to_str().unwrap();
    assert_ok(
        &check(&config, &[("FLOWGATE_SESSION_SECRET_FILE", secret)]),
        "OK (1 route, 1 flow, 0 users)",
    );
    assert_ok(
        &check(&config, &[("FLOWGATE_SESSION_SECRET", SECRET)]),
        "OK (1 route, 1 flow, 0 users)",
    );
}

#[test]
fn the_example_config_passes_check() {
    let config = repo().join("config/flowgate.toml");
    assert_ok(&check(&config, &[]), "OK (1 route, 4 flows, 0 users)");
    assert_ok(
        &check(&config, &[("FLOWGATE_SESSION_SECRET", SECRET)]),
        "OK (1 route, 4 flows, 0 users)",
    );
}

/// "The values shown are the defaults where one exists": the example reads
/// exactly as a config that gives only what has no default (the upstream).
#[test]
fn the_example_config_shows_the_defaults() {
    let path = repo().join("config/flowgate.toml");
    let example = flowgate::config::from_str(&read("config/flowgate.toml"), &path, &|_| None)
        .expect("config/flowgate.toml is valid");
    let minimal = flowgate::config::from_str(
        "[[route]]\nupstream = \"http://127.0.0.1:3000\"\n",
        &path,
        &|_| None,
    )
    .expect("the minimal config is valid");
    assert_eq!(format!("{example:#?}"), format!("{minimal:#?}"));
}

// ---- a running gate ----

/// `flowgate serve`, killed on drop.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    admin: SocketAddr,
}

impl Serve {
    fn start(config: &Path, env: &[(String, String)]) -> Serve {
        let mut child = flowgate()
            .arg("serve")
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            // Tests run side by side: loopback, a free port each.
            .env("FLOWGATE_SERVER_LISTEN", "127.0.0.1:0")
            .env("FLOWGATE_ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start flowgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut serve = Serve {
            child,
            log,
            admin: "0.0.0.0:0".parse().unwrap(),
        };
        serve.wait_for_log("listening on 127.0.0.1:", Duration::from_secs(30));
        serve.wait_for_log("admin listening on ", Duration::from_secs(5));
        let log = serve.log();
        let admin = log
            .split("admin listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in:\n{log}"));
        serve.admin = admin;
        serve.wait_ready();
        serve
    }

    /// Until the admin listener says `200` on `/readyz`.
    fn wait_ready(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut answer = String::new();
            if let Ok(mut stream) = std::net::TcpStream::connect(self.admin) {
                let _ = stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let _ = stream.read_to_string(&mut answer);
            }
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never ready: {answer:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{needle:?} never appeared in the log:\n{}", self.log());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the HEALTHCHECK line as Docker does (`/bin/sh -c`), pointed at `port`.
fn run_healthcheck(command: &str, port: u16) -> Output {
    let command = command.replace(
        "/dev/tcp/127.0.0.1/9090",
        &format!("/dev/tcp/127.0.0.1/{port}"),
    );
    Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .output()
        .unwrap()
}

#[test]
fn the_image_healthcheck_passes_on_a_ready_gate_and_fails_otherwise() {
    if !require_program("bash") {
        return;
    }
    let stage = final_stage(&read("deploy/Dockerfile"));
    let command = healthcheck_command(&stage);
    assert!(command.contains("/dev/tcp/127.0.0.1/9090"), "{command}");
    let root = tempfile::tempdir().unwrap();
    let config = image_layout(root.path());
    let env = image_env(&stage, root.path());
    assert!(
        env.iter().any(|(k, v)| k == "NO_COLOR" && v == "1"),
        "{env:?}"
    );
    let gate = Serve::start(&config, &env);
    assert!(
        !gate.log().contains('\u{1b}'),
        "colour codes in the log:\n{}",
        gate.log()
    );

    let healthy = run_healthcheck(&command, gate.admin.port());
    assert!(
        healthy.status.success(),
        "the HEALTHCHECK failed on a ready gate: {}",
        String::from_utf8_lossy(&healthy.stderr)
    );

    // The traffic port answers /readyz with a login redirect, not a 200.
    let traffic = gate
        .log()
        .lines()
        .find_map(|l| {
            let rest = l.split("listening on ").nth(1)?;
            (!l.contains("admin listening")).then(|| rest.split_whitespace().next())?
        })
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .expect("the traffic address");
    assert!(
        !run_healthcheck(&command, traffic.port()).status.success(),
        "the HEALTHCHECK took a non-200 answer for healthy"
    );

    // Nothing listening: unhealthy.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(
        !run_healthcheck(&command, closed).status.success(),
        "the HEALTHCHECK passed with nothing listening"
    );
}

// ---- the systemd unit ----

/// `(key, value)` of every `Key=value` line of the unit.
fn unit_entries(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn values<'a>(entries: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Run one `Exec…=` command line of the unit here: the binary and config
/// paths rewritten to the test's, `$MAINPID` to `pid`.
fn run_exec_line(line: &str, config: &Path, pid: u32, env: &[(String, String)]) -> Output {
    let line = line
        .replace("/usr/local/bin/flowgate", env!("CARGO_BIN_EXE_flowgate"))
        .replace("/etc/flowgate/flowgate.toml", config.to_str().unwrap())
        .replace("$MAINPID", &pid.to_string());
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut command = if words[0] == env!("CARGO_BIN_EXE_flowgate") {
        flowgate()
    } else {
        Command::new(words[0])
    };
    command
        .args(&words[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[test]
fn the_systemd_unit_checks_then_reloads_with_sighup_and_reads_its_secret_credential() {
    let unit = read("deploy/flowgate.service");
    let entries = unit_entries(&unit);
    // Hardened: its own user, a read-only system, no privilege but the one
    // that binds :443, a state directory of its own.
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("StateDirectory", "flowgate"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
    ] {
        assert_eq!(values(&entries, key), [value], "{key}");
    }
    let reload = values(&entries, "ExecReload");
    assert_eq!(
        reload.last(),
        Some(&"/bin/kill -HUP $MAINPID"),
        "`systemctl reload` needs ExecReload: {reload:?}"
    );
    assert_eq!(
        values(&entries, "LoadCredential"),
        ["session-secret:/etc/flowgate/session-secret"]
    );
    let environment = values(&entries, "Environment");
    assert!(
        environment.contains(&"FLOWGATE_SESSION_SECRET_FILE=%d/session-secret"),
        "{environment:?}"
    );
    assert!(
        unit.contains("head -c 32 /dev/urandom | base64"),
        "how to make the secret"
    );
    assert!(unit.contains("chmod 600 /etc/flowgate/session-secret"));
    // The state file goes where systemd lets the dynamic user write.
    assert_eq!(values(&entries, "StateDirectory"), ["flowgate"]);
    assert!(
        environment.contains(&"FLOWGATE_STATE_PATH=%S/flowgate/flowgate.state"),
        "{environment:?}"
    );

    // What systemd would do, by hand: the credential in a private folder
    // (%d), the unit's environment, ExecStartPre, ExecStart, then each
    // ExecReload line in turn.
    let root = tempfile::tempdir().unwrap();
    let config = image_layout(root.path());
    let credentials = root.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("session-secret"), format!("{SECRET}\n")).unwrap();
    let env: Vec<(String, String)> = environment
        .iter()
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            let state = root.path().join("var/lib");
            (
                k.to_owned(),
                v.replace("%d", credentials.to_str().unwrap())
                    .replace("%S", state.to_str().unwrap()),
            )
        })
        .collect();
    for line in values(&entries, "ExecStartPre") {
        let output = run_exec_line(line, &config, 0, &env);
        assert!(
            output.status.success(),
            "ExecStartPre={line}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let start = values(&entries, "ExecStart");
    assert_eq!(
        start,
        ["/usr/local/bin/flowgate serve --config /etc/flowgate/flowgate.toml"]
    );
    let gate = Serve::start(&config, &env);
    assert!(
        !gate.log().contains("no session secret configured"),
        "the credential was not read:\n{}",
        gate.log()
    );
    assert!(
        root.path()
            .join("var/lib/flowgate/flowgate.state")
            .is_file(),
        "the state file in the StateDirectory:\n{}",
        gate.log()
    );
    for line in &reload {
        let output = run_exec_line(line, &config, gate.pid(), &env);
        assert!(
            output.status.success(),
            "ExecReload={line}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    gate.wait_for_log("configuration reloaded (SIGHUP)", Duration::from_secs(10));

    // A broken config fails the reload before any signal is sent.
    std::fs::write(&config, "[server]\nlsten = \"x\"\n").unwrap();
    let first = run_exec_line(reload[0], &config, gate.pid(), &env);
    assert!(
        !first.status.success() && reload.len() > 1,
        "ExecReload checks the config first"
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    // Not in `.ci/run`'s packages: a plain skip, even with FLOWGATE_REQUIRE_ALL=1.
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: systemd-analyze is not installed; install systemd to verify deploy/flowgate.service");
        return;
    }
    // verify insists that every Exec… binary exists: point the copy at the
    // binary just built, and leave everything else as shipped.
    let dir = tempfile::tempdir().unwrap();
    let unit = read("deploy/flowgate.service")
        .replace("/usr/local/bin/flowgate", env!("CARGO_BIN_EXE_flowgate"));
    let path = dir.path().join("flowgate.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys and bad values are warnings with a zero exit: any line
    // about this unit fails the test (lines about the host's own units don't).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("flowgate.service"))
        .collect();
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

// ---- deploy/compose: the homelab example ----

/// `"host:container"` (and `:ro`) of a Compose short-syntax entry.
fn compose_pair(entry: &serde_json::Value) -> (String, String) {
    let text = entry.as_str().unwrap_or_else(|| panic!("{entry}"));
    let mut parts = text.split(':');
    let host = parts.next().unwrap().to_owned();
    let container = parts.next().unwrap_or_else(|| panic!("{text}")).to_owned();
    (host, container)
}

/// The port of a `"host:port"` listen address in the config.
fn port_of(config: &toml::Value, section: &str, key: &str) -> u16 {
    let text = config[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("{section}.{key}"));
    text.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn the_compose_homelab_passes_check_as_mounted_and_names_the_ports_flowgate_uses() {
    let compose: serde_json::Value =
        yaml_serde::from_str(&read("deploy/compose/docker-compose.yml")).expect("the YAML parses");
    let services = compose["services"].as_object().expect("services");
    let gate = &services["flowgate"];
    let folder = repo().join("deploy/compose");

    // Lay the service's mounts out under a root, as the container sees
    // them: the repository's folders copied, a certificate made for the
    // certificate folder (which the user brings).
    let root = tempfile::tempdir().unwrap();
    let inside = |path: &str| root.path().join(path.trim_start_matches('/'));
    let mut state_volume = false;
    for entry in gate["volumes"].as_array().expect("volumes") {
        let (host, container) = compose_pair(entry);
        if container == "/var/lib/flowgate" {
            state_volume = true;
            assert!(
                compose["volumes"].get(&host).is_some(),
                "{host} is a named volume"
            );
            continue;
        }
        let target = inside(&container);
        std::fs::create_dir_all(&target).unwrap();
        let source = folder.join(&host);
        if source.is_dir() {
            for file in std::fs::read_dir(&source).unwrap() {
                let file = file.unwrap().path();
                std::fs::copy(&file, target.join(file.file_name().unwrap())).unwrap();
            }
        }
    }
    assert!(state_volume, "the image's state volume is kept");
    let config_text = std::fs::read_to_string(inside("/etc/flowgate/flowgate.toml"))
        .expect("./flowgate is mounted at /etc/flowgate, with the config");
    let config: toml::Value = toml::from_str(&config_text).unwrap();
    let ca = common::ca::Ca::new("homelab test CA");
    let leaf = ca.issue(&["photos.home.example", "notes.home.example"], 1);
    let tls = &config["server"]["tls"];
    for (key, pem) in [("cert", &leaf.cert_pem), ("key", &leaf.key_pem)] {
        let path = tls[key].as_str().unwrap();
        assert!(path.starts_with("/etc/flowgate-certs/"), "{path}");
        std::fs::write(inside(path), pem).unwrap();
    }
    // The config names paths inside the container; here they are under the
    // root (the only change made to the file).
    let root_text = root.path().to_str().unwrap();
    let laid_out = inside("/etc/flowgate/flowgate.toml");
    std::fs::write(
        &laid_out,
        config_text.replace("\"/etc/", &format!("\"{root_text}/etc/")),
    )
    .unwrap();
    let environment = gate["environment"].as_object().expect("environment");
    let secret_path = environment["FLOWGATE_SESSION_SECRET_FILE"]
        .as_str()
        .unwrap();
    std::fs::write(inside(secret_path), format!("{SECRET}\n")).unwrap();
    let secret = inside(secret_path);
    let output = check(
        &laid_out,
        &[("FLOWGATE_SESSION_SECRET_FILE", secret.to_str().unwrap())],
    );
    assert_ok(&output, "OK (2 routes");

    // What it publishes is what the config listens on; the admin port
    // (the HEALTHCHECK's) is not published.
    let published: Vec<u16> = gate["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| compose_pair(p).1.parse().unwrap())
        .collect();
    assert_eq!(
        published,
        [
            port_of(&config, "server", "listen"),
            port_of(&config, "server", "redirect_http")
        ]
    );
    assert!(!published.contains(&port_of(&config, "admin", "listen")));
    assert!(
        healthcheck_command(&final_stage(&read("deploy/Dockerfile")))
            .contains(&format!("/{}", port_of(&config, "admin", "listen")))
    );

    // Each route's upstream is a service of the file, on the port it
    // listens on, and publishes nothing of its own.
    for route in config["route"].as_array().unwrap() {
        let upstream = url::Url::parse(route["upstream"].as_str().unwrap()).unwrap();
        let name = upstream.host_str().unwrap();
        let service = services
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"));
        let command: Vec<&str> = service["command"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        let port = upstream.port().unwrap().to_string();
        assert!(
            command.windows(2).any(|w| w == ["--port", port.as_str()]),
            "{name}: {command:?}"
        );
        assert!(
            service.get("ports").is_none(),
            "{name} is reached through flowgate only"
        );
    }
}

// ---- deploy/kubernetes: the sidecar ----

/// Every document of a multi-document YAML file.
fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    yaml_serde::Deserializer::from_str(text)
        .map(|document| serde_json::Value::deserialize(document).expect("the YAML parses"))
        .collect()
}

fn of_kind<'d>(documents: &'d [serde_json::Value], kind: &str) -> &'d serde_json::Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_kubernetes_sidecar_passes_check_as_mounted_and_probes_what_flowgate_serves() {
    let documents = yaml_documents(&read("deploy/kubernetes/sidecar.yaml"));
    let deployment = of_kind(&documents, "Deployment");
    let pod = &deployment["spec"]["template"];
    let containers = pod["spec"]["containers"].as_array().unwrap();
    let named = |name: &str| {
        containers
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    };
    let gate = named("flowgate");
    let volumes = pod["spec"]["volumes"].as_array().unwrap();

    // The mounts laid out under a root: the ConfigMap's and the Secret's
    // files, the session secret kubectl makes.
    let root = tempfile::tempdir().unwrap();
    let inside = |path: &str| root.path().join(path.trim_start_matches('/'));
    let mut secret_mount = None;
    for mount in gate["volumeMounts"].as_array().unwrap() {
        let at = mount["mountPath"].as_str().unwrap();
        std::fs::create_dir_all(inside(at)).unwrap();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        let files = if let Some(name) = volume["configMap"]["name"].as_str() {
            let map = documents
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name);
            map.map(|m| m["data"].clone())
        } else if let Some(name) = volume["secret"]["secretName"].as_str() {
            let secret = documents
                .iter()
                .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name);
            if secret.is_none() {
                // Made by `kubectl create secret` (the file's header).
                secret_mount = Some(at.to_owned());
            }
            secret.map(|s| s["stringData"].clone())
        } else {
            None
        };
        for (file, text) in files.iter().flat_map(|f| f.as_object().unwrap()) {
            std::fs::write(inside(at).join(file), text.as_str().unwrap()).unwrap();
        }
    }
    let env: Vec<(String, String)> = gate["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = e["value"].as_str().unwrap();
            (e["name"].as_str().unwrap().to_owned(), value.to_owned())
        })
        .collect();
    let secret_file = &env
        .iter()
        .find(|(k, _)| k == "FLOWGATE_SESSION_SECRET_FILE")
        .unwrap()
        .1;
    assert!(
        secret_mount.is_some_and(|at| secret_file.starts_with(&at)),
        "the session secret is read from the mounted Secret"
    );
    std::fs::write(inside(secret_file), format!("{SECRET}\n")).unwrap();

    let args: Vec<&str> = gate["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args[..2], ["serve", "--config"]);
    let config_text = std::fs::read_to_string(inside(args[2])).expect("the config is mounted");
    let laid_out = inside(args[2]);
    let root_text = root.path().to_str().unwrap();
    std::fs::write(
        &laid_out,
        config_text.replace("\"/etc/", &format!("\"{root_text}/etc/")),
    )
    .unwrap();
    let secret = inside(secret_file);
    let state = inside("/var/lib/flowgate/flowgate.state");
    assert_ok(
        &check(
            &laid_out,
            &[
                ("FLOWGATE_SESSION_SECRET_FILE", secret.to_str().unwrap()),
                ("FLOWGATE_STATE_PATH", state.to_str().unwrap()),
            ],
        ),
        "OK (1 route",
    );

    // Ports, probes and scraping name what the config listens on and
    // what the admin listener serves.
    let config: toml::Value = toml::from_str(&config_text).unwrap();
    let port = |name: &str| -> u16 {
        let ports = gate["ports"].as_array().unwrap();
        let found = ports.iter().find(|p| p["name"] == name).unwrap();
        found["containerPort"].as_u64().unwrap() as u16
    };
    assert_eq!(port("http"), port_of(&config, "server", "listen"));
    assert_eq!(port("admin"), port_of(&config, "admin", "listen"));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(gate[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(gate[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], port("admin").to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let service = of_kind(&documents, "Service");
    let targets: Vec<&serde_json::Value> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["targetPort"])
        .collect();
    assert_eq!(
        targets,
        ["http"],
        "the Service reaches flowgate, never the app"
    );
    let allowed: Vec<u64> = of_kind(&documents, "NetworkPolicy")["spec"]["ingress"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(allowed, [port("http") as u64, port("admin") as u64]);

    // The app is reached on the pod's loopback, on the port it is given.
    let upstream = url::Url::parse(config["route"][0]["upstream"].as_str().unwrap()).unwrap();
    assert_eq!(upstream.host_str(), Some("127.0.0.1"));
    let app_args: Vec<&str> = named("app")["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let app_port = upstream.port().unwrap().to_string();
    assert!(app_args
        .windows(2)
        .any(|w| w == ["--port", app_port.as_str()]));

    // A graceful end: the grace period outlasts the readiness delay.
    let delay = config["server"]["shutdown_delay"].as_str().unwrap();
    let delay: u64 = delay.trim_end_matches('s').parse().unwrap();
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(grace > delay + 10, "{grace} s for a {delay} s delay");
}
