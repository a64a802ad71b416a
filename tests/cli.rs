//! The command line as an operator meets it: `check` on good and bad
//! configs, `hash-password`, and `demo` started and logged into.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use flowgate::config::UserField;
use flowgate::directory::Directory;

fn flowgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    command
        .env_remove("FLOWGATE_SESSION_SECRET")
        .env_remove("FLOWGATE_CONFIG");
    command
}

#[test]
fn check_accepts_the_shipped_example_config() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flowgate.toml");
    let output = flowgate()
        .arg("check")
        .arg("--config")
        .arg(&example)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("OK (1 route, 4 flows, 0 users)"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_error_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowgate.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:8080\"\nlsten = \"x\"\n\n[session]\nidle_timeout = \"soon\"\nsecret = \"too-short\"\n\n[[route]]\nupstream = \"not a url\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("users.toml"), "").unwrap();
    let output = flowgate()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = path.display().to_string();
    for expected in [
        format!("{file}:3: server.lsten: unknown key (did you mean `listen`?)"),
        format!("{file}:6: session.idle_timeout: \"soon\" is not a duration"),
        format!("{file}:7: session.secret: the secret is 9 bytes"),
        format!("{file}:10: route[0].upstream: \"not a url\" is not a URL"),
        "4 problems found".to_owned(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("too-short"),
        "a secret was echoed:\n{stderr}"
    );
}

/// `check` warns as `serve` would about a missing secret, and still
/// passes: a random secret works, it only signs everybody out on restart.
#[test]
fn check_warns_about_a_missing_session_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowgate.toml");
    std::fs::write(
        &path,
        "[state]\nstore = \"memory\"\n[[route]]\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("users.toml"), "").unwrap();
    let output = flowgate()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: no session secret"), "{stderr}");
    let with_secret = flowgate()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env(
            "FLOWGATE_SESSION_SECRET",
            "0123456789abcdef0123456789abcdef",
        )
        .output()
        .unwrap();
    assert!(with_secret.status.success());
    assert!(!String::from_utf8_lossy(&with_secret.stderr).contains("warning"));
    // The embedded store keeps a secret of its own: nothing to warn about.
    std::fs::write(&path, "[[route]]\nupstream = \"http://127.0.0.1:9\"\n").unwrap();
    let embedded = flowgate()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(embedded.status.success());
    assert!(!String::from_utf8_lossy(&embedded.stderr).contains("warning"));
}

#[test]
fn check_names_a_broken_users_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowgate.toml");
    std::fs::write(&path, "[[route]]\nupstream = \"http://127.0.0.1:9\"\n").unwrap();
    std::fs::write(
        dir.path().join("users.toml"),
        "[[user]]\nusername = \"eve\"\npassword = \"plaintext\"\n",
    )
    .unwrap();
    let output = flowgate()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("users.toml"), "{stderr}");
    assert!(
        stderr.contains("users.toml:3: user[0].password: not a PHC hash string"),
        "{stderr}"
    );
}

/// Every folder of tests/fixtures/check: `check` prints exactly its
/// `expected.txt` (every problem, one per line, file:line: key: message,
/// the config's and the users file's together) and fails; `serve` refuses
/// the same config for the same reasons.
#[test]
fn check_judges_every_broken_config_as_serve_would() {
    let cases = fixtures().join("check");
    let mut seen = 0;
    for entry in std::fs::read_dir(&cases).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        seen += 1;
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let expected = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
        let checked = flowgate()
            .current_dir(&dir)
            .args(["check", "--config", "flowgate.toml"])
            .output()
            .unwrap();
        assert_eq!(checked.status.code(), Some(1), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&checked.stderr),
            expected,
            "check in {name}"
        );
        let served = flowgate()
            .current_dir(&dir)
            .args(["serve", "--config", "flowgate.toml"])
            .output()
            .unwrap();
        assert_eq!(served.status.code(), Some(1), "serve in {name}");
        let stderr = String::from_utf8_lossy(&served.stderr);
        let problems: Vec<&str> = expected
            .lines()
            .filter(|l| !l.ends_with(" found"))
            .collect();
        for problem in problems {
            assert!(
                stderr.contains(problem),
                "serve in {name} lacks {problem:?}:\n{stderr}"
            );
        }
    }
    assert!(seen >= 5, "only {seen} cases in {}", cases.display());
}

/// A misspelt override is an error, as a misspelt key is; the good ones
/// and variables of no section pass.
#[test]
fn check_names_environment_variables_no_setting_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowgate.toml");
    std::fs::write(
        &path,
        "[state]\nstore = \"memory\"\n[[route]]\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("users.toml"), "").unwrap();
    let output = flowgate()
        .args(["check", "--config"])
        .arg(&path)
        .env("FLOWGATE_SESSION_IDLE_TIMOUT", "3m")
        .env("FLOWGATE_SESSION_IDLE_TIMEOUT", "3m")
        .env("FLOWGATE_REQUIRE_ALL", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr,
        "env FLOWGATE_SESSION_IDLE_TIMOUT: no setting reads this variable \
         (did you mean FLOWGATE_SESSION_IDLE_TIMEOUT?)\n1 problem found\n"
    );
}

#[test]
fn serve_refuses_a_bad_config_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flowgate.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let output = flowgate()
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("route: nothing to protect"), "{stderr}");
}

#[test]
fn hash_password_prints_an_argon2id_phc_string_that_verifies() {
    let mut child = flowgate()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret pass\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    let users = format!("[[user]]\nusername = \"u\"\npassword = \"{hash}\"\n");
    let directory = flowgate::directory::FileDirectory::parse(&users, "users.toml").unwrap();
    let user = directory.find("u", &[UserField::Username]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(
        rt.block_on(directory.verify_password(Some(&user), "s3cret pass")),
        "the printed hash does not verify"
    );
    assert!(!rt.block_on(directory.verify_password(Some(&user), "s3cret pas")));
}

/// `flowgate demo` as the README runs it: prints where and how to log in,
/// and the printed credentials work.
#[tokio::test]
async fn the_demo_prints_how_to_log_in_and_it_works() {
    let mut child = flowgate()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--password",
            "demo-password-1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            printed.push_str(&line);
            printed.push('\n');
            if line.trim_start().starts_with("password") {
                let _ = tx.send(printed.clone());
            }
        }
    });
    let printed = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the demo printed no login details");
    let url = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("open"))
        .map(|u| u.trim().trim_end_matches('/').to_owned());
    let url = url.unwrap_or_else(|| panic!("no URL in:\n{printed}"));
    assert!(printed.contains("username  demo"), "{printed}");
    assert!(printed.contains("password  demo-password-1"), "{printed}");

    let client = client();
    let anonymous = client
        .get(format!("{url}/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 302);
    let done = json_login(&client, &url, "demo", "demo-password-1", "/hello").await;
    assert_eq!(done["component"], "xak-flow-redirect", "{done}");
    let echoed: serde_json::Value = get_json(&client, format!("{url}/hello")).await;
    assert_eq!(echoed["path"], "/hello");
    assert_eq!(echoed["headers"]["x-forwarded-user"], "demo", "{echoed}");
    let _ = child.kill();
    let _ = child.wait();
}
