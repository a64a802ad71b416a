//! The command line: `serve`, `check`, `sessions`, `totp`, `recovery-codes`,
//! `hash-password`, `demo`. The only
//! place (with `demo`) that uses `anyhow`; everything it calls has typed errors.

use std::io::{BufRead, IsTerminal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "flowgate",
    version,
    about = "An authenticating reverse-proxy gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`: the config file every command but `demo` reads.
#[derive(clap::Args)]
struct ConfigFile {
    /// The config file.
    #[arg(
        long = "config",
        value_name = "FILE",
        short = 'c',
        env = "FLOWGATE_CONFIG",
        default_value = "config/flowgate.toml",
        global = true
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Validate a configuration (and its users file); print every problem.
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// List or end sessions in the configured state store (beside a
    /// running server too).
    Sessions {
        #[command(flatten)]
        config: ConfigFile,
        #[command(subcommand)]
        action: SessionsAction,
    },
    /// Enrol, list or remove a user's TOTP devices in the configured
    /// state store.
    Totp {
        #[command(flatten)]
        config: ConfigFile,
        #[command(subcommand)]
        action: TotpAction,
    },
    /// Make a new set of recovery codes for a user (the old set stops
    /// working) and print them, once.
    RecoveryCodes {
        #[command(flatten)]
        config: ConfigFile,
        user: String,
    },
    /// Read a password from standard input and print its argon2id PHC hash.
    HashPassword,
    /// Protect a built-in echo app with one user, to see flowgate work.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The demo user's password (default: a random one, printed).
        #[arg(long, env = "FLOWGATE_DEMO_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

#[derive(Subcommand)]
enum SessionsAction {
    /// The signed-in sessions, newest first.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// As JSON (what the admin listener's GET /sessions answers).
        #[arg(long)]
        json: bool,
    },
    /// End sessions: all of one user's, or one by the id `list` shows.
    Revoke {
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        user: Option<String>,
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum TotpAction {
    /// A new device: prints the otpauth:// URI and its QR code.
    Enroll {
        user: String,
        /// What `list` calls it.
        #[arg(long, default_value = "Authenticator app")]
        name: String,
        /// The name the app shows the account under.
        #[arg(long, default_value = "flowgate")]
        issuer: String,
    },
    /// The user's devices: the users file's and the store's.
    List { user: String },
    /// Remove one of the store's devices (`--device` as `list` shows it), or all.
    Remove {
        user: String,
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        device: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(&config.path),
        Command::Check { config } => return check(&config.path),
        Command::Sessions { config, action } => sessions(&config.path, action),
        Command::Totp { config, action } => totp(&config.path, action),
        Command::RecoveryCodes { config, user } => recovery_codes(&config.path, &user),
        Command::HashPassword => hash_password(),
        Command::Demo { listen, password } => {
            init_logging(LogFormat::Text, "info");
            log_version();
            runtime(2).and_then(|rt| rt.block_on(crate::demo::run(listen, password)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flowgate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `workers` threads serve requests; with one, a single-threaded runtime
/// (no work stealing, no cross-thread wake-ups). Password hashing always
/// runs on the separate blocking pool.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    Ok(builder.enable_all().build()?)
}

fn serve(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    init_logging(config.log.format, &config.log.level);
    log_version();
    let workers = config.server.workers;
    let runtime = runtime(workers)?;
    let app = crate::build(config, Some(path.to_path_buf())).map_err(|e| anyhow::anyhow!(e))?;
    runtime
        .block_on(crate::listener::serve(app))
        .map_err(|e| anyhow::anyhow!(e))
}

fn load(path: &Path) -> anyhow::Result<Config> {
    crate::config::load(path).map_err(|errors| {
        let count = errors.0.len();
        anyhow::anyhow!(
            "{errors}\n{count} problem{} in the configuration",
            if count == 1 { "" } else { "s" }
        )
    })
}

fn check(path: &Path) -> ExitCode {
    let config = match crate::config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("{error}");
            }
            let count = errors.0.len();
            eprintln!("{count} problem{} found", if count == 1 { "" } else { "s" });
            return ExitCode::FAILURE;
        }
    };
    if config.session.secret.is_none() && config.state.store == crate::config::StoreKind::Memory {
        // As `serve` says it at start: not an error, but worth knowing.
        // (The embedded store keeps a secret of its own.)
        eprintln!(
            "{}: warning: no session secret (session.secret_file or FLOWGATE_SESSION_SECRET) \
             and state.store = \"memory\": flowgate will make a random one per process",
            path.display()
        );
    }
    if let crate::config::ExecutorConfig::Remote(remote) = &config.executor {
        println!(
            "{}: OK ({} route{}, flows run by the remote executor at {})",
            path.display(),
            config.routes.len(),
            plural(config.routes.len()),
            remote.url,
        );
        return ExitCode::SUCCESS;
    }
    match crate::directory::FileDirectory::load(&config.directory.users_file) {
        Ok(users) => {
            println!(
                "{}: OK ({} route{}, {} flow{}, {} user{})",
                path.display(),
                config.routes.len(),
                plural(config.routes.len()),
                config.flows.len(),
                plural(config.flows.len()),
                users.len(),
                plural(users.len()),
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            eprintln!("1 problem found");
            ExitCode::FAILURE
        }
    }
}

/// `flowgate sessions …`: straight on the configured store (the embedded
/// file may be open in a running server at the same time; it hears of
/// what is ended here within a quarter second).
fn sessions(path: &Path, action: SessionsAction) -> anyhow::Result<()> {
    use crate::session::Key;
    let config = load(path)?;
    if config.state.store == crate::config::StoreKind::Memory {
        anyhow::bail!(
            "state.store is \"memory\": the sessions live inside the running flowgate; ask its admin listener (GET /sessions, with admin.token_file's token)"
        );
    }
    let runtime = runtime(1)?;
    let _inside = runtime.enter();
    let store = open_store(&config, "the sessions")?;
    runtime.block_on(async {
        match action {
            SessionsAction::List { user, json } => {
                let listed = store.list(user.as_deref()).await?;
                if json {
                    println!("{}", serde_json::json!({ "sessions": listed }));
                    return Ok(());
                }
                if listed.is_empty() {
                    println!("no signed-in sessions");
                    return Ok(());
                }
                println!("{:<64}  {:<20}  {:<20}  {:<20}  groups", "id", "user", "signed in", "ends");
                for l in &listed {
                    println!(
                        "{:<64}  {:<20}  {:<20}  {:<20}  {}",
                        l.id,
                        l.user,
                        when(l.created),
                        when(l.idle_deadline),
                        l.groups.join(",")
                    );
                }
                Ok(())
            }
            SessionsAction::Revoke { user, id } => {
                let ended = match (user, id) {
                    (Some(user), _) => {
                        let ended = store.delete_all_for_user(&user).await?;
                        if ended == 0 {
                            eprintln!("no session of {user:?} is live (`flowgate sessions list` shows whose are)");
                        }
                        ended
                    }
                    (None, Some(id)) => {
                        let key = Key::parse(&id).ok_or_else(|| {
                            anyhow::anyhow!("{id:?} is not a session id as `flowgate sessions list` shows them (64 hex digits)")
                        })?;
                        store.delete_key(&key).await? as usize
                    }
                    (None, None) => anyhow::bail!("say --user NAME or --id ID"),
                };
                println!("{ended} session{} ended", plural(ended));
                Ok(())
            }
        }
    })
}

/// The configured state store, opened for a command beside a running
/// server; refused for the memory store, which lives inside the server.
fn open_store(config: &Config, what: &str) -> anyhow::Result<crate::session::Store> {
    use crate::session::{Store, StoreOptions};
    if config.state.store == crate::config::StoreKind::Memory {
        anyhow::bail!(
            "state.store is \"memory\": {what} would be gone when this command ends; set [state] store = \"embedded\" or \"redis\""
        );
    }
    let backend = crate::session::open_backend(config)?;
    Ok(Store::new(
        backend,
        StoreOptions::for_idle(config.session.idle_timeout),
    ))
}

/// A user the users file has, by any case of the name.
fn known_user(
    config: &Config,
    name: &str,
) -> anyhow::Result<std::sync::Arc<crate::directory::User>> {
    let directory = crate::directory::FileDirectory::load(&config.directory.users_file)?;
    use crate::directory::Directory;
    directory
        .find(name, &[crate::config::UserField::Username])
        .ok_or_else(|| anyhow::anyhow!("no user {name:?} in the users file"))
}

/// `flowgate totp …`.
fn totp(path: &Path, action: TotpAction) -> anyhow::Result<()> {
    use crate::engine::mfa;
    let config = load(path)?;
    let runtime = runtime(1)?;
    let _inside = runtime.enter();
    let store = open_store(&config, "a device")?;
    runtime.block_on(async {
        match action {
            TotpAction::Enroll { user, name, issuer } => {
                let user = known_user(&config, &user)?;
                let secret = mfa::new_secret();
                let uri = mfa::otpauth_uri(&issuer, &user.username, &secret);
                let mut shown = format!("{uri}\n\n");
                if let Ok(code) = qrcode::QrCode::new(uri.as_bytes()) {
                    let art = code
                        .render::<qrcode::render::unicode::Dense1x2>()
                        .dark_color(qrcode::render::unicode::Dense1x2::Light)
                        .light_color(qrcode::render::unicode::Dense1x2::Dark)
                        .build();
                    shown.push_str(&art);
                    shown.push('\n');
                }
                // Shown before it is kept: a device nobody saw the secret
                // of (output to a closed pipe) is never enrolled.
                show(&shown).context("the secret could not be shown: nothing was enrolled")?;
                let record = mfa::add_totp(&store, &user.username, &name, &secret)
                    .await
                    .context("the device above could not be kept: it is NOT enrolled")?;
                eprintln!("device s{} of {} ({name}) enrolled", record.id, user.username);
                Ok(())
            }
            TotpAction::List { user } => {
                let user = known_user(&config, &user)?;
                let stored = mfa::devices(&store, &user.username).await?;
                if user.totp.is_empty() && stored.totp.is_empty() {
                    println!("{} has no TOTP device", user.username);
                }
                for device in &user.totp {
                    println!("{:<6}  users file", device.uid);
                }
                for record in &stored.totp {
                    println!("s{:<5}  {}  (enrolled {})", record.id, record.name, when(record.created));
                }
                println!(
                    "{} unused recovery code{}",
                    stored.recovery.len(),
                    plural(stored.recovery.len())
                );
                Ok(())
            }
            TotpAction::Remove { user, device, all } => {
                let user = known_user(&config, &user)?;
                let id = match (device, all) {
                    (_, true) => None,
                    (Some(device), false) => Some(
                        device
                            .strip_prefix('s')
                            .and_then(|id| id.parse::<u32>().ok())
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "{device:?} is not a device of the store (they are s1, s2, …; the users file's are edited there)"
                                )
                            })?,
                    ),
                    (None, false) => anyhow::bail!("say --device ID or --all"),
                };
                let removed = mfa::remove_totp(&store, &user.username, id).await?;
                if removed == 0 {
                    anyhow::bail!("{} has no such device in the store", user.username);
                }
                println!("{removed} device{} removed", plural(removed));
                Ok(())
            }
        }
    })
}

/// `flowgate recovery-codes USER`.
fn recovery_codes(path: &Path, user: &str) -> anyhow::Result<()> {
    use crate::engine::mfa;
    let config = load(path)?;
    let runtime = runtime(1)?;
    let _inside = runtime.enter();
    let store = open_store(&config, "the codes")?;
    let user = known_user(&config, user)?;
    let codes = mfa::new_recovery_codes();
    let mut shown = format!(
        "recovery codes of {} (each works once; any set before no longer does):\n",
        user.username
    );
    for code in &codes {
        shown.push_str(&format!("  {code}\n"));
    }
    // Shown before they are kept: codes nobody saw never replace a set.
    show(&shown).context("the codes could not be shown: the old set still works")?;
    runtime
        .block_on(mfa::set_recovery_codes(&store, &user.username, &codes))
        .context("the codes above could not be kept: they do NOT work; the old set still does")?;
    Ok(())
}

/// Write `text` to standard output, all of it, or say why not.
fn show(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Unix seconds as UTC, to the second.
fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn hash_password() -> anyhow::Result<()> {
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Password: ")?
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    let hash = crate::directory::hash_password(&password)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("{hash}");
    Ok(())
}

/// Logs go to stderr; `RUST_LOG` overrides the configured level. Colours
/// only on a terminal, and never with `NO_COLOR` set: a file, a pipe or
/// journald gets plain text that fail2ban and grep can read.
fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Colour codes in the log: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The first line of every run: which flowgate this is.
fn log_version() {
    tracing::info!("flowgate {} starting", env!("CARGO_PKG_VERSION"));
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some("".as_ref())),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(true, Some("1".as_ref())));
        assert!(!colour(false, None));
        assert!(!colour(false, Some("1".as_ref())));
    }
}
