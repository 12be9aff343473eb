//! `devstack run` (the body of `./dev test`) and `devstack up` (the body of `./dev up`).

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use devstack::instances::{Fleet, FleetConfig, ServerProcess};
use devstack::{http, sys, Stack, StackConfig};

#[derive(Parser)]
#[command(
    name = "devstack",
    about = "Floodgate's local PostgreSQL + Redis (+ booking-api and queue-server) stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a stack, run a command against it, stop the stack; exit with the command's code.
    Run(RunArgs),
    /// Start the dev stack, booking-api and queue-server with demo data; run until Ctrl-C.
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
    /// A local Redis Cluster (three primaries, a replica each) on six ports from --redis-port
    /// instead of one Redis; FLOODGATE_TEST_REDIS_URL is its `redis-cluster://` URL and
    /// REDIS_CLUSTER_NODES lists its nodes.
    #[arg(long)]
    redis_cluster: bool,
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
    #[arg(long, env = "FLOODGATE_DEV_QUEUE_PORT", default_value_t = 8081)]
    queue_port: u16,
    /// A local Redis Cluster (three primaries, a replica each) on six ports from --redis-port
    /// instead of one Redis; .dev/env lists its nodes as REDIS_CLUSTER_NODES.
    #[arg(long)]
    redis_cluster: bool,
    /// N booking-api and N queue-server processes behind HAProxy, which listens on
    /// --booking-port and --queue-port; .dev/env lists the instances as BOOKING_INSTANCE_URLS
    /// and QUEUE_INSTANCE_URLS.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=32))]
    instances: Option<u16>,
    /// The booking-api binary (relative paths: to the current directory, else to the checkout)
    /// [default: $CARGO_TARGET_DIR/release/booking-api, CARGO_TARGET_DIR defaulting to target]
    #[arg(long)]
    booking_bin: Option<PathBuf>,
    /// The queue-server binary (relative paths: to the current directory, else to the checkout)
    /// [default: $CARGO_TARGET_DIR/release/queue-server]
    #[arg(long)]
    queue_bin: Option<PathBuf>,
    /// Stack name: a second stack beside the "dev" one (other ports too), with its own state,
    /// `.dev/up-<name>.pid` and `.dev/env-<name>`.
    #[arg(long, default_value = devstack::DEV_STACK_NAME, hide = true)]
    name: String,
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
    let cfg = StackConfig {
        name: args.name.clone(),
        redis_port: args.redis_port,
        pg_port: args.pg_port,
    };
    let mut stack = if args.redis_cluster {
        Stack::start_cluster(cfg)?
    } else {
        Stack::start(cfg)?
    };
    signals.check()?;
    eprintln!(
        "devstack: stack {:?} up: {} {} (state in {})",
        args.name,
        stack.redis_url(),
        stack.database_url(),
        stack.state_dir().display()
    );

    // The command stays in our process group: a Ctrl-C at the terminal reaches it directly.
    let mut command = Command::new(&args.command[0]);
    if let Some(nodes) = stack.redis_cluster_nodes() {
        command.env("REDIS_CLUSTER_NODES", nodes);
    }
    let mut child = command
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

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

const DEMO_GA_DROP: &str = r#"{"name":"Demo drop — Floodgate tee","currency":"USD","per_fan_limit":4,"hold_ttl_s":300,"admission":{"mode":"open"},"inventory":{"kind":"ga","skus":[{"sku":"TEE-S","name":"Tee, small","price_cents":2500,"quantity":50},{"sku":"TEE-M","name":"Tee, medium","price_cents":2500,"quantity":100}]}}"#;
const DEMO_SEATED_DROP: &str = r#"{"name":"Demo concert","per_fan_limit":6,"hold_ttl_s":300,"admission":{"mode":"open"},"inventory":{"kind":"seated","sections":[{"section":"A","price_cents":9000,"rows":[{"row":"1","seats":12},{"row":"2","seats":12},{"row":"3","seats":14}]},{"section":"B","price_cents":5000,"rows":[{"row":"1","seats":20},{"row":"2","seats":20}]}]}}"#;
const DEMO_QUEUE_DROP: &str = r#"{"name":"Demo queue drop — Floodgate hoodie","currency":"USD","per_fan_limit":2,"hold_ttl_s":300,"admission":{"mode":"queue","rate_per_s":2,"burst":5,"max_active":50},"inventory":{"kind":"ga","skus":[{"sku":"HOODIE","name":"Hoodie","price_cents":6000,"quantity":200}]}}"#;

fn up(args: UpArgs) -> Result<u8> {
    let signals = Signals::install()?;
    let root = devstack::workspace_root()?;
    let dev_dir = root.join(".dev");
    fs::create_dir_all(&dev_dir).with_context(|| format!("creating {}", dev_dir.display()))?;
    let booking_bin = resolve_bin(
        args.booking_bin,
        "booking-api",
        &root,
        "floodgate-booking-api",
    )?;
    let queue_bin = resolve_bin(
        args.queue_bin,
        "queue-server",
        &root,
        "floodgate-queue-server",
    )?;
    let default_name = args.name == devstack::DEV_STACK_NAME;
    if !args
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("--name {:?}: use letters, digits, '-', '_', '.'", args.name);
    }
    let (pid_name, env_name) = if default_name {
        ("up.pid".to_string(), "env".to_string())
    } else {
        (
            format!("up-{}.pid", args.name),
            format!("env-{}", args.name),
        )
    };

    let _pid_file = PidFile::claim(dev_dir.join(pid_name))?;
    devstack::ensure_installed()?;

    // Servers orphaned by a devstack that was SIGKILLed would hold their ports.
    let state_dir = devstack::state_root()?.join(&args.name);
    let servers = [
        (
            "booking-api",
            args.booking_port,
            "--booking-port or FLOODGATE_DEV_BOOKING_PORT",
        ),
        (
            "queue-server",
            args.queue_port,
            "--queue-port or FLOODGATE_DEV_QUEUE_PORT",
        ),
    ];
    // ... and an earlier `--instances` run's HAProxy and instances.
    devstack::instances::stop_leftovers(&state_dir);
    for (name, port, how) in servers {
        sys::kill_stale(&ServerProcess::pid_file(&state_dir, name), name);
        if !sys::port_is_free(port) {
            bail!("port {port} (for {name}) is already in use on 127.0.0.1; choose another with {how}");
        }
    }
    if args.booking_port == args.queue_port {
        bail!("booking-api and queue-server need different ports");
    }

    eprintln!(
        "devstack: starting PostgreSQL on :{} and {} ...",
        args.pg_port,
        if args.redis_cluster {
            format!(
                "a Redis Cluster on :{}-{}",
                args.redis_port,
                args.redis_port
                    .saturating_add(devstack::cluster::CLUSTER_NODE_COUNT - 1)
            )
        } else {
            format!("Redis on :{}", args.redis_port)
        }
    );
    let cfg = StackConfig {
        name: args.name.clone(),
        redis_port: args.redis_port,
        pg_port: args.pg_port,
    };
    let started = if args.redis_cluster {
        Stack::start_cluster(cfg)
    } else {
        Stack::start(cfg)
    };
    let mut stack = started.context("starting the dev stack (ports: --redis-port/FLOODGATE_DEV_REDIS_PORT, --pg-port/FLOODGATE_DEV_PG_PORT)")?;
    signals.check()?;

    // Fan tokens signed by booking-api and admission tokens signed by queue-server must verify in
    // the other process: both get the same secrets, fresh for every run.
    let identity_secret = random_hex_secret()?;
    let admission_secret = random_hex_secret()?;
    let booking_url = format!("http://127.0.0.1:{}", args.booking_port);
    let queue_url = format!("http://127.0.0.1:{}", args.queue_port);
    let shared = [
        ("FLOODGATE_DATABASE_URL", stack.database_url()),
        ("FLOODGATE_REDIS_URL", stack.redis_url()),
        ("FLOODGATE_DEV_IDENTITY", "true".to_string()),
        // Quoted: figment would read a secret of digits only as a number.
        (
            "FLOODGATE_IDENTITY__DEV_SECRET",
            format!("\"{identity_secret}\""),
        ),
        (
            "FLOODGATE_ADMISSION__SECRETS",
            format!("[\"{admission_secret}\"]"),
        ),
    ];
    let mut booking_env = shared.to_vec();
    booking_env.push((
        "FLOODGATE_HTTP__LISTEN",
        format!("127.0.0.1:{}", args.booking_port),
    ));
    // The queue page (queue-server's origin) signs fans in at booking-api and reads the drop.
    booking_env.push((
        "FLOODGATE_HTTP__CORS_ALLOW_ORIGINS",
        format!("[\"{queue_url}\"]"),
    ));
    // The front page links a queue drop to its queue page at queue-server's public URL.
    booking_env.push(("FLOODGATE_QUEUE__PUBLIC_URL", queue_url.clone()));
    let mut queue_env = shared.to_vec();
    queue_env.push((
        "FLOODGATE_QUEUE__LISTEN",
        format!("127.0.0.1:{}", args.queue_port),
    ));
    queue_env.push(("FLOODGATE_QUEUE__BOOKING_PUBLIC_URL", booking_url.clone()));

    eprintln!("devstack: creating API keys (booking-api applies migrations first) ...");
    let seller_key = create_key(&booking_bin, &booking_env, "seller", "dev-seller")?;
    signals.check()?;
    let ops_key = create_key(&booking_bin, &booking_env, "ops", "dev-ops")?;
    signals.check()?;

    // Declared after `stack`, so on an error they stop (drop) before it does.
    let mut servers = match args.instances {
        None => {
            let mut api = spawn_server(
                "booking-api",
                &booking_bin,
                &["serve"],
                &booking_env,
                args.booking_port,
                stack.state_dir(),
            )?;
            let mut queue = spawn_server(
                "queue-server",
                &queue_bin,
                &[],
                &queue_env,
                args.queue_port,
                stack.state_dir(),
            )?;
            for server in [&mut api, &mut queue] {
                let ready = server.wait_ready(&|| signals.any());
                signals.check()?;
                ready?;
            }
            Servers::One { api, queue }
        }
        Some(n) => {
            let fleet = Fleet::start(
                &FleetConfig {
                    booking_bin: booking_bin.clone(),
                    queue_bin: queue_bin.clone(),
                    instances: usize::from(n),
                    booking_port: args.booking_port,
                    queue_port: args.queue_port,
                    booking_env: {
                        let mut env = owned(&shared);
                        env.push(("FLOODGATE_QUEUE__PUBLIC_URL".into(), queue_url.clone()));
                        env
                    },
                    queue_env: owned(&shared),
                    state_dir: stack.state_dir().to_path_buf(),
                    drain_unready_ms: devstack::haproxy::DRAIN_UNREADY_MS,
                },
                &|| signals.any(),
            );
            signals.check()?;
            Servers::Fleet(fleet?)
        }
    };

    let ga_drop = create_drop(args.booking_port, &seller_key, DEMO_GA_DROP)?;
    let seated_drop = create_drop(args.booking_port, &seller_key, DEMO_SEATED_DROP)?;
    let queue_drop = create_drop(args.booking_port, &seller_key, DEMO_QUEUE_DROP)?;

    let mut vars = vec![
        ("BOOKING_URL", booking_url.clone()),
        ("QUEUE_URL", queue_url.clone()),
        ("DATABASE_URL", stack.database_url()),
        ("REDIS_URL", stack.redis_url()),
        ("FLOODGATE_SELLER_KEY", seller_key),
        ("FLOODGATE_OPS_KEY", ops_key),
        ("DEMO_DROP_ID", ga_drop.clone()),
        ("DEMO_SEATED_DROP_ID", seated_drop.clone()),
        ("DEMO_QUEUE_DROP_ID", queue_drop.clone()),
    ];
    if let Some(nodes) = stack.redis_cluster_nodes() {
        vars.push(("REDIS_CLUSTER_NODES", nodes));
    }
    if let Servers::Fleet(fleet) = &servers {
        vars.push(("BOOKING_INSTANCE_URLS", fleet.booking_instance_urls()));
        vars.push(("QUEUE_INSTANCE_URLS", fleet.queue_instance_urls()));
    }
    let env_text: String = vars
        .iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect();
    let env_file = dev_dir.join(env_name);
    fs::write(&env_file, &env_text).with_context(|| format!("writing {}", env_file.display()))?;
    let logs = if default_name {
        dev_dir.join("state")
    } else {
        stack.state_dir().to_path_buf()
    };
    let ws_url = format!(
        "ws://127.0.0.1:{}/v1/drops/{queue_drop}/queue/ws",
        args.queue_port
    );

    println!();
    println!("Floodgate dev stack is up.");
    println!("  API                {booking_url}/v1");
    println!("  health             {booking_url}/healthz");
    println!("  ready              {booking_url}/readyz");
    println!("  metrics            {booking_url}/metrics (with the ops key as Bearer)");
    println!("  fan page (tee)     {booking_url}/drops/{ga_drop}");
    println!("  fan page (concert) {booking_url}/drops/{seated_drop}");
    println!("  queue-server       {queue_url}");
    println!("  queue health       {queue_url}/healthz");
    println!("  queue ready        {queue_url}/readyz");
    println!("  queue metrics      {queue_url}/metrics (with the ops key as Bearer)");
    println!("  fan queue (hoodie) {queue_url}/drops/{queue_drop}");
    println!(
        "  queue (hoodie)     {ws_url}, first message {{\"type\":\"auth\",\"fan_token\":...}}"
    );
    println!(
        "  queue join (HTTP)  POST {queue_url}/v1/drops/{queue_drop}/queue, then GET .../queue/me"
    );
    if let Servers::Fleet(fleet) = &servers {
        println!("  (both hosts are HAProxy: the fan host {queue_url} serves the queue page, the shop and booking-api's API)");
        println!("  booking-api        {}", fleet.booking_instance_urls());
        println!("  queue-server       {}", fleet.queue_instance_urls());
        println!(
            "  HAProxy            {}/haproxy.cfg, admin socket haproxy.sock",
            logs.display()
        );
    }
    println!("  logs               {}/", logs.display());
    println!();
    println!(
        "{} (load it with: set -a; . {}; set +a):",
        env_file.display(),
        env_file.strip_prefix(&root).unwrap_or(&env_file).display()
    );
    print!("{env_text}");
    println!();
    println!("Ctrl-C stops queue-server, booking-api, Redis and PostgreSQL.");
    let _ = std::io::stdout().flush();

    let mut code = 0;
    'watch: loop {
        if signals.any() {
            eprintln!("\ndevstack: stopping ...");
            break;
        }
        if let Some(exited) = servers.exited()? {
            eprintln!("devstack: {exited}; stopping the stack");
            code = 1;
            break 'watch;
        }
        thread::sleep(Duration::from_millis(200));
    }
    // In order: queue-server (it tells its sockets to go), then booking-api (it drains in-flight
    // requests against Redis and Postgres), then the stack; the pid file goes last, when
    // `_pid_file` drops.
    servers.stop();
    stack.stop();
    eprintln!("devstack: stopped");
    Ok(code)
}

/// What serves the API: one booking-api and one queue-server, or (`--instances N`) N of each
/// behind HAProxy.
enum Servers {
    One {
        api: ServerProcess,
        queue: ServerProcess,
    },
    Fleet(Fleet),
}

impl Servers {
    /// What exited on its own, with its log tail, if anything did.
    fn exited(&mut self) -> Result<Option<String>> {
        match self {
            Servers::One { api, queue } => {
                for server in [queue, api] {
                    if let Some(status) = server.exited()? {
                        return Ok(Some(format!(
                            "{} exited on its own ({status})\n{}",
                            server.name,
                            server.log_tail()
                        )));
                    }
                }
                Ok(None)
            }
            Servers::Fleet(fleet) => Ok(fleet.exited()),
        }
    }

    /// In order: queue-server (it tells its sockets to go), then booking-api (it drains
    /// in-flight requests against Redis and Postgres), then HAProxy.
    fn stop(&mut self) {
        match self {
            Servers::One { api, queue } => {
                queue.stop();
                api.stop();
            }
            Servers::Fleet(fleet) => fleet.stop(),
        }
    }
}

/// 32 bytes from /dev/urandom, hex-encoded.
fn random_hex_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(hex::encode(bytes))
}

/// A server binary: `bin` as given, else relative to the checkout; without `bin`, `name` where
/// `cargo build --release` puts it (`./dev up` builds there, honouring `CARGO_TARGET_DIR`).
/// `package` is what builds it.
fn resolve_bin(bin: Option<PathBuf>, name: &str, root: &Path, package: &str) -> Result<PathBuf> {
    let bin = bin.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
        PathBuf::from(target).join("release").join(name)
    });
    let bin = bin.as_path();
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
        "binary not found at {} (build it: cargo build --release -p {package})",
        bin.display()
    )
}

fn server_command(bin: &Path, env: &[(&str, String)]) -> Command {
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
    let out = server_command(bin, env)
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

/// Starts one of `devstack up`'s servers (booking-api, queue-server) and says where.
fn spawn_server(
    name: &str,
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
    port: u16,
    state_dir: &Path,
) -> Result<ServerProcess> {
    let server = ServerProcess::spawn(name, bin, args, &owned(env), port, state_dir)?;
    eprintln!(
        "devstack: starting {name} on http://127.0.0.1:{port} (log: {}) ...",
        server.log_file.display()
    );
    Ok(server)
}

/// An environment as [`ServerProcess`] and [`FleetConfig`] take it.
fn owned(env: &[(&str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// `.dev/up.pid` (`.dev/up-<name>.pid`): one `devstack up` per checkout and stack name.
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
