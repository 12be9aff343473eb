//! `devstack run` (the body of `./dev test`) and `devstack up` (the body of `./dev up`).

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use devstack::{http, sys, Stack, StackConfig};

#[derive(Parser)]
#[command(
    name = "devstack",
    about = "Floodgate's local PostgreSQL + Redis (+ booking-api) stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a stack, run a command against it, stop the stack; exit with the command's code.
    Run(RunArgs),
    /// Start the dev stack and booking-api with demo data; run until Ctrl-C.
    Up(UpArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Stack name; names starting with "test" or "fault" start from empty state every time.
    #[arg(long, default_value = "test")]
    name: String,
    #[arg(long, env = "FLOODGATE_TEST_REDIS_PORT", default_value_t = 6390)]
    redis_port: u16,
    #[arg(long, env = "FLOODGATE_TEST_PG_PORT", default_value_t = 5440)]
    pg_port: u16,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

#[derive(Args)]
struct UpArgs {
    #[arg(long, env = "FLOODGATE_DEV_REDIS_PORT", default_value_t = 6379)]
    redis_port: u16,
    #[arg(long, env = "FLOODGATE_DEV_PG_PORT", default_value_t = 5432)]
    pg_port: u16,
    #[arg(long, env = "FLOODGATE_DEV_BOOKING_PORT", default_value_t = 8080)]
    booking_port: u16,
    /// The booking-api binary (relative paths: to the current directory, else to the checkout).
    #[arg(long, default_value = "target/release/booking-api")]
    booking_bin: PathBuf,
}

/// Returned when SIGINT/SIGTERM arrives while `up` is still starting things.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Up(args) => up(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("devstack: interrupted; everything it started is stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("devstack: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM set these flags instead of killing us, so we can stop what we started.
struct Signals {
    int: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Signals> {
        let int = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&int))
            .context("installing the SIGINT handler")?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&term))
            .context("installing the SIGTERM handler")?;
        Ok(Signals { int, term })
    }

    fn any(&self) -> bool {
        self.int.load(Ordering::SeqCst) || self.term.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<()> {
        if self.any() {
            return Err(Interrupted.into());
        }
        Ok(())
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

// ---------------------------------------------------------------------------------------------
// devstack run

fn run(args: RunArgs) -> Result<u8> {
    let signals = Signals::install()?;
    let mut stack = Stack::start(StackConfig {
        name: args.name.clone(),
        redis_port: args.redis_port,
        pg_port: args.pg_port,
    })?;
    signals.check()?;
    eprintln!(
        "devstack: stack {:?} up: {} {} (state in {})",
        args.name,
        stack.redis_url(),
        stack.database_url(),
        stack.state_dir().display()
    );

    // The command stays in our process group: a Ctrl-C at the terminal reaches it directly.
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("FLOODGATE_TEST_REDIS_URL", stack.redis_url())
        .env("FLOODGATE_TEST_DATABASE_URL", stack.database_url())
        .env("REDIS_URL", stack.redis_url())
        .env("DATABASE_URL", stack.database_url())
        .spawn()
        .with_context(|| format!("running {:?}", args.command[0]))?;

    let (mut sent_int, mut sent_term) = (false, false);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        // A signal sent to devstack alone (kill, CI timeout) is passed on to the command.
        if signals.term.load(Ordering::SeqCst) && !sent_term {
            sent_term = sys::send_signal(child.id(), "TERM");
        }
        if signals.int.load(Ordering::SeqCst) && !sent_int {
            sent_int = sys::send_signal(child.id(), "INT");
        }
        thread::sleep(Duration::from_millis(100));
    };
    stack.stop();
    Ok(exit_code(status))
}

// ---------------------------------------------------------------------------------------------
// devstack up

/// How long booking-api may take to answer `GET /readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long booking-api gets to shut down gracefully after SIGTERM.
const BOOKING_STOP_GRACE: Duration = Duration::from_secs(10);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 40;

const DEMO_GA_DROP: &str = r#"{"name":"Demo drop — Floodgate tee","currency":"USD","per_fan_limit":4,"hold_ttl_s":300,"admission":{"mode":"open"},"inventory":{"kind":"ga","skus":[{"sku":"TEE-S","name":"Tee, small","price_cents":2500,"quantity":50},{"sku":"TEE-M","name":"Tee, medium","price_cents":2500,"quantity":100}]}}"#;
const DEMO_SEATED_DROP: &str = r#"{"name":"Demo concert","per_fan_limit":6,"hold_ttl_s":300,"admission":{"mode":"open"},"inventory":{"kind":"seated","sections":[{"section":"A","price_cents":9000,"rows":[{"row":"1","seats":12},{"row":"2","seats":12},{"row":"3","seats":14}]},{"section":"B","price_cents":5000,"rows":[{"row":"1","seats":20},{"row":"2","seats":20}]}]}}"#;

fn up(args: UpArgs) -> Result<u8> {
    let signals = Signals::install()?;
    let root = devstack::workspace_root()?;
    let dev_dir = root.join(".dev");
    fs::create_dir_all(&dev_dir).with_context(|| format!("creating {}", dev_dir.display()))?;
    let booking_bin = resolve_booking_bin(&args.booking_bin, &root)?;

    let _pid_file = PidFile::claim(dev_dir.join("up.pid"))?;
    devstack::ensure_installed()?;

    // A booking-api orphaned by a devstack that was SIGKILLed would hold the port.
    let dev_state = devstack::state_root()?.join(devstack::DEV_STACK_NAME);
    let booking_pid_file = dev_state.join("booking-api.pid");
    sys::kill_stale(&booking_pid_file, "booking-api");
    if !sys::port_is_free(args.booking_port) {
        bail!(
            "port {} (for booking-api) is already in use on 127.0.0.1; \
             choose another with --booking-port or FLOODGATE_DEV_BOOKING_PORT",
            args.booking_port
        );
    }

    eprintln!(
        "devstack: starting PostgreSQL on :{} and Redis on :{} ...",
        args.pg_port, args.redis_port
    );
    let mut stack = Stack::start(StackConfig {
        name: devstack::DEV_STACK_NAME.to_string(),
        redis_port: args.redis_port,
        pg_port: args.pg_port,
    })
    .context("starting the dev stack (ports: --redis-port/FLOODGATE_DEV_REDIS_PORT, --pg-port/FLOODGATE_DEV_PG_PORT)")?;
    signals.check()?;

    let booking_url = format!("http://127.0.0.1:{}", args.booking_port);
    let env = vec![
        ("FLOODGATE_DATABASE_URL", stack.database_url()),
        ("FLOODGATE_REDIS_URL", stack.redis_url()),
        (
            "FLOODGATE_HTTP__LISTEN",
            format!("127.0.0.1:{}", args.booking_port),
        ),
        ("FLOODGATE_DEV_IDENTITY", "true".to_string()),
    ];

    eprintln!("devstack: creating API keys (booking-api applies migrations first) ...");
    let seller_key = create_key(&booking_bin, &env, "seller", "dev-seller")?;
    signals.check()?;
    let ops_key = create_key(&booking_bin, &env, "ops", "dev-ops")?;
    signals.check()?;

    let log_file = stack.state_dir().join("booking-api.log");
    eprintln!(
        "devstack: starting booking-api on {booking_url} (log: {}) ...",
        log_file.display()
    );
    let mut api = BookingApi::spawn(&booking_bin, &env, &log_file, booking_pid_file)?;
    api.wait_ready(args.booking_port, &signals)?;

    let ga_drop = create_drop(args.booking_port, &seller_key, DEMO_GA_DROP)?;
    let seated_drop = create_drop(args.booking_port, &seller_key, DEMO_SEATED_DROP)?;

    let vars = [
        ("BOOKING_URL", booking_url.clone()),
        ("DATABASE_URL", stack.database_url()),
        ("REDIS_URL", stack.redis_url()),
        ("FLOODGATE_SELLER_KEY", seller_key),
        ("FLOODGATE_OPS_KEY", ops_key),
        ("DEMO_DROP_ID", ga_drop.clone()),
        ("DEMO_SEATED_DROP_ID", seated_drop.clone()),
    ];
    let env_text: String = vars
        .iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect();
    let env_file = dev_dir.join("env");
    fs::write(&env_file, &env_text).with_context(|| format!("writing {}", env_file.display()))?;

    println!();
    println!("Floodgate dev stack is up.");
    println!("  API                {booking_url}/v1");
    println!("  health             {booking_url}/healthz");
    println!("  ready              {booking_url}/readyz");
    println!("  metrics            {booking_url}/metrics");
    println!("  fan page (tee)     {booking_url}/drops/{ga_drop}");
    println!("  fan page (concert) {booking_url}/drops/{seated_drop}");
    println!("  logs               {}/", dev_dir.join("state").display());
    println!();
    println!(
        "{} (load it with: set -a; . .dev/env; set +a):",
        env_file.display()
    );
    print!("{env_text}");
    println!();
    println!("Ctrl-C stops booking-api, Redis and PostgreSQL.");
    let _ = std::io::stdout().flush();

    let mut code = 0;
    loop {
        if signals.any() {
            eprintln!("\ndevstack: stopping ...");
            break;
        }
        if let Some(status) = api.child.try_wait()? {
            eprintln!(
                "devstack: booking-api exited on its own ({status}); stopping the stack\n--- {} ---\n{}",
                log_file.display(),
                sys::tail(&log_file, LOG_TAIL_LINES)
            );
            code = 1;
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    // In order: the API first (it drains in-flight requests against Redis and Postgres), then
    // the stack; the pid file goes last, when `_pid_file` drops.
    api.stop();
    stack.stop();
    eprintln!("devstack: stopped");
    Ok(code)
}

fn resolve_booking_bin(bin: &Path, root: &Path) -> Result<PathBuf> {
    let candidates = if bin.is_absolute() {
        vec![bin.to_path_buf()]
    } else {
        vec![bin.to_path_buf(), root.join(bin)]
    };
    for c in &candidates {
        if c.is_file() {
            return c
                .canonicalize()
                .with_context(|| format!("resolving {}", c.display()));
        }
    }
    bail!(
        "booking-api binary not found at {} (build it: cargo build --release -p floodgate-booking-api)",
        bin.display()
    )
}

fn booking_command(bin: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(bin);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Own process group: the terminal's Ctrl-C reaches devstack only, which stops it in order.
    cmd.stdin(Stdio::null()).process_group(0);
    cmd
}

/// `booking-api create-key --scope SCOPE --name NAME` prints the new key on its last line.
fn create_key(bin: &Path, env: &[(&str, String)], scope: &str, name: &str) -> Result<String> {
    let out = booking_command(bin, env)
        .args(["create-key", "--scope", scope, "--name", name])
        .output()
        .with_context(|| format!("running {} create-key", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "booking-api create-key --scope {scope} failed ({}):\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    match stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(key) => Ok(key.to_string()),
        None => bail!("booking-api create-key --scope {scope} printed no key"),
    }
}

/// `POST /v1/drops` as the seller; returns the new drop's id.
fn create_drop(port: u16, seller_key: &str, body: &str) -> Result<String> {
    let auth = format!("Bearer {seller_key}");
    let resp = http::request(
        port,
        "POST",
        "/v1/drops",
        &[("Authorization", &auth)],
        Some(body),
        HTTP_TIMEOUT,
    )?;
    if resp.status != 201 {
        bail!(
            "creating a demo drop: POST /v1/drops answered {}: {}",
            resp.status,
            resp.body
        );
    }
    let json: serde_json::Value = serde_json::from_str(&resp.body)
        .with_context(|| format!("POST /v1/drops answered non-JSON: {}", resp.body))?;
    match &json["drop_id"] {
        serde_json::Value::String(id) => Ok(id.clone()),
        serde_json::Value::Number(id) => Ok(id.to_string()),
        _ => bail!("POST /v1/drops answered without drop_id: {}", resp.body),
    }
}

/// Shell-safe `KEY=value` right-hand side: bare when harmless, else single-quoted.
fn shell_quote(value: &str) -> String {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+,=".contains(c));
    if bare {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// The running `booking-api serve`; dropping it stops it.
struct BookingApi {
    child: Child,
    log_file: PathBuf,
    pid_file: PathBuf,
}

impl BookingApi {
    fn spawn(
        bin: &Path,
        env: &[(&str, String)],
        log_file: &Path,
        pid_file: PathBuf,
    ) -> Result<BookingApi> {
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(log_file)
            .with_context(|| format!("opening {}", log_file.display()))?;
        let child = booking_command(bin, env)
            .arg("serve")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {} serve", bin.display()))?;
        fs::write(&pid_file, child.id().to_string())?;
        Ok(BookingApi {
            child,
            log_file: log_file.to_path_buf(),
            pid_file,
        })
    }

    fn wait_ready(&mut self, port: u16, signals: &Signals) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            signals.check()?;
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "booking-api exited before it was ready ({status})\n--- {} ---\n{}",
                    self.log_file.display(),
                    sys::tail(&self.log_file, LOG_TAIL_LINES)
                );
            }
            if let Ok(resp) = http::request(port, "GET", "/readyz", &[], None, HTTP_TIMEOUT) {
                if resp.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "booking-api did not answer GET /readyz with 200 within {READY_TIMEOUT:?}\n--- {} ---\n{}",
                    self.log_file.display(),
                    sys::tail(&self.log_file, LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGTERM (graceful shutdown), up to 10 s, then SIGKILL. Safe to call twice.
    fn stop(&mut self) {
        sys::terminate_child(&mut self.child, BOOKING_STOP_GRACE);
        let _ = fs::remove_file(&self.pid_file);
    }
}

impl Drop for BookingApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `.dev/up.pid`: one `devstack up` per checkout.
struct PidFile {
    path: PathBuf,
}

impl PidFile {
    fn claim(path: PathBuf) -> Result<PidFile> {
        let me = std::process::id();
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(me.to_string().as_bytes())?;
                    return Ok(PidFile { path });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    if let Ok(pid) = text.trim().parse::<u32>() {
                        if pid != me
                            && sys::pid_alive(pid)
                            && sys::pid_cmdline(pid).contains("devstack")
                        {
                            bail!(
                                "`./dev up` is already running for this checkout (pid {pid}); \
                                 stop it with Ctrl-C in its terminal or `kill {pid}`"
                            );
                        }
                    }
                    // Left by a run that was killed: take it over.
                    let _ = fs::remove_file(&path);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!("could not claim {}", path.display())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let mine = fs::read_to_string(&self.path)
            .map(|t| t.trim() == std::process::id().to_string())
            .unwrap_or(false);
        if mine {
            let _ = fs::remove_file(&self.path);
        }
    }
}
