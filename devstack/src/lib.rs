//! Starts and stops the PostgreSQL 15 and Redis that `./dev up`, `./dev test` and the fault tests
//! run against. Each stack has a name ("dev", "test", "fault-pg-1", ...) and keeps its state under
//! `/var/tmp/floodgate-<hash of the checkout path>/<name>/`, outside the checkout: the checkout may
//! sit under a 0700 directory that the `postgres` user (Postgres refuses to run as root) can't enter.
//!
//! Stacks whose name starts with `test` or `fault` are throwaway: each start wipes their state and
//! Postgres runs without fsync. Any other name (`dev`) keeps its data from one start to the next.
//!
//! ```no_run
//! let stack = devstack::Stack::start(devstack::StackConfig {
//!     name: "fault-example".into(),
//!     redis_port: devstack::free_port(),
//!     pg_port: devstack::free_port(),
//! })?;
//! println!("{} {}", stack.redis_url(), stack.database_url());
//! # anyhow::Ok(())
//! ```
//!
//! # Layout
//! - `lib.rs`: [`Stack`], [`StackConfig`], [`free_port`], [`ensure_installed`], where state lives.
//! - `pg`: one Postgres cluster: initdb, pg_ctl (as the `postgres` user when we are root), psql.
//! - `redis`: one redis-server child process (appendonly everysec) and a raw-TCP PING.
//! - [`cluster`]: a local Redis Cluster of six such servers (three primaries with a replica
//!   each), which [`Stack::start_cluster`] runs in place of the lone Redis.
//! - [`sys`]: process helpers over `/proc` and the `kill` command, log tails, port checks.
//! - [`http`]: a tiny blocking HTTP/1.1 client that `devstack up` uses.
//! - [`netns`]: [`NetLink`], a network namespace + veth pair whose packets a test drops (loss, a
//!   partition); the network-fault tests run Redis or Postgres behind one.
//! - `relay`: [`DelayRelay`], a TCP relay that adds latency (kernels without `tc netem`).
//! - [`haproxy`]: HAProxy's config (two path-routed frontends, `/readyz` checks, WebSockets,
//!   `X-Forwarded-For`, maxconn) and one haproxy child process.
//! - [`instances`]: [`instances::Fleet`], N booking-api and N queue-server processes behind
//!   HAProxy (`devstack up --instances N`, the instance-kill fault test).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub mod cluster;
pub mod haproxy;
pub mod http;
pub mod instances;
pub mod netns;
mod pg;
mod redis;
mod relay;
pub mod sys;

pub use netns::{is_kernel_refusal, KernelRefused, NetLink};
pub use relay::DelayRelay;

/// Where every stack of every checkout keeps its state: `<STATE_BASE>/floodgate-<hash>/<name>`.
pub const STATE_BASE: &str = "/var/tmp";
/// The stack `./dev up` runs; its state is linked from `<checkout>/.dev/state`.
pub const DEV_STACK_NAME: &str = "dev";

/// Which server of a stack runs behind its [`NetLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BehindLink {
    Redis,
    Postgres,
}

/// What to start: a name for the state directory and the two loopback ports.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// e.g. "dev", "test", "fault-pg-1": letters, digits, `-`, `_`, `.`.
    pub name: String,
    pub redis_port: u16,
    pub pg_port: u16,
}

/// A running Postgres + Redis pair. Dropping it stops both.
pub struct Stack {
    cfg: StackConfig,
    state_dir: PathBuf,
    pg: pg::Postgres,
    pg_running: bool,
    redis: redis::Redis,
    /// Redis' network namespace, when it runs behind one; dropped after Redis stops.
    link: Option<NetLink>,
    /// The Redis Cluster that runs in place of the lone Redis ([`Stack::start_cluster`]).
    cluster: Option<cluster::Cluster>,
}

impl Stack {
    /// Initialises the stack's state if needed, starts Postgres and Redis, waits until both
    /// answer and creates the database `floodgate`. Servers left running by an earlier run of
    /// the same stack (a crash, a SIGKILL) are stopped first.
    pub fn start(cfg: StackConfig) -> Result<Stack> {
        Stack::start_inner(cfg, None, false)
    }

    /// As [`Stack::start`], with a Redis Cluster in place of the lone Redis: six nodes on
    /// `cfg.redis_port .. cfg.redis_port + 6` (their buses 10000 above), three primaries with a
    /// replica each, a node timeout of a second and `cluster-require-full-coverage no`, so one
    /// shard failing over doesn't stop the others. [`Stack::redis_url`] is then the
    /// `redis-cluster://` URL naming every node.
    pub fn start_cluster(cfg: StackConfig) -> Result<Stack> {
        Stack::start_inner(cfg, None, true)
    }

    /// As [`Stack::start`], but Redis runs inside a network namespace of its own and listens on
    /// the inside end of a veth pair ([`NetLink`]): [`Stack::redis_url`] points there, and
    /// [`Stack::link`] drops packets on the way (loss, a partition). Postgres stays on loopback.
    /// Fails with a [`KernelRefused`] where the kernel won't make the link.
    pub fn start_with_redis_behind_link(cfg: StackConfig) -> Result<Stack> {
        Stack::start_behind_link(cfg, BehindLink::Redis)
    }

    /// As [`Stack::start_with_redis_behind_link`], for either server: the other one stays on
    /// loopback.
    pub fn start_behind_link(cfg: StackConfig, which: BehindLink) -> Result<Stack> {
        validate_name(&cfg.name)?;
        let link = NetLink::create()?;
        Stack::start_inner(cfg, Some((link, which)), false)
    }

    fn start_inner(
        cfg: StackConfig,
        link: Option<(NetLink, BehindLink)>,
        clustered: bool,
    ) -> Result<Stack> {
        validate_name(&cfg.name)?;
        // (address, namespace) for the server behind the link; loopback for the other.
        let place = |server: BehindLink| match &link {
            Some((l, which)) if *which == server => {
                (l.inside_addr(), Some(l.namespace().to_owned()))
            }
            _ => (Ipv4Addr::LOCALHOST, None),
        };
        let (pg_listen, pg_netns) = place(BehindLink::Postgres);
        let (redis_bind, redis_netns) = place(BehindLink::Redis);
        let link = link.map(|(l, _)| l);
        ensure_installed()?;
        let root = state_root()?;
        let state_dir = root.join(&cfg.name);
        let throwaway = is_throwaway(&cfg.name);
        let as_postgres_user = sys::is_root();

        create_traversable_dir(&root)?;
        create_traversable_dir(&state_dir)?;

        let pg = pg::Postgres {
            state_dir: state_dir.clone(),
            data_dir: state_dir.join("pg"),
            socket_dir: state_dir.join("pg-sock"),
            log_file: state_dir.join("postgres.log"),
            port: cfg.pg_port,
            fast: throwaway,
            as_postgres_user,
            listen: pg_listen,
            netns: pg_netns,
        };
        let redis = redis::Redis {
            dir: state_dir.join("redis"),
            log_file: state_dir.join("redis.log"),
            pid_file: state_dir.join("redis.pid"),
            port: cfg.redis_port,
            bind: redis_bind,
            netns: redis_netns,
            cluster: false,
            child: None,
        };
        let cluster = if clustered {
            install_missing(&[("redis-cli", "redis-tools")])?;
            Some(cluster::Cluster::new(
                &state_dir.join("redis-cluster"),
                cfg.redis_port,
            )?)
        } else {
            None
        };

        // Servers of an earlier run of this stack hold the ports and the data: stop them first.
        sys::kill_stale(&redis.pid_file, "redis-server");
        for node in cluster.iter().flat_map(|c| &c.nodes) {
            sys::kill_stale(&node.pid_file, "redis-server");
        }
        if let pg::Status::Running = pg.status()? {
            eprintln!(
                "devstack: stopping a PostgreSQL left running on {}",
                pg.data_dir.display()
            );
            pg.stop()?;
        }
        if throwaway {
            fs::remove_dir_all(&state_dir)
                .with_context(|| format!("wiping {}", state_dir.display()))?;
            create_traversable_dir(&state_dir)?;
        }

        let redis_ports = match &cluster {
            Some(c) => c.all_ports(),
            None => vec![cfg.redis_port],
        };
        let ports = redis_ports
            .iter()
            .map(|p| ("Redis", *p))
            .chain([("PostgreSQL", cfg.pg_port)]);
        for (what, port) in ports {
            if !sys::port_is_free(port) {
                bail!(
                    "port {port} (for {what} of stack {:?}) is already in use on 127.0.0.1; \
                     stop whatever listens there or choose another port",
                    cfg.name
                );
            }
        }
        if redis_ports.contains(&cfg.pg_port) {
            bail!("Redis and PostgreSQL can't share port {}", cfg.pg_port);
        }

        pg.prepare()?;
        let mut stack = Stack {
            cfg,
            state_dir,
            pg,
            pg_running: false,
            redis,
            link,
            cluster,
        };
        // From here on, an error drops `stack`, which stops whatever did start.
        stack.start_postgres()?;
        stack.pg.create_database()?;
        match &mut stack.cluster {
            Some(cluster) => cluster.start()?,
            None => stack.start_redis()?,
        }
        if stack.cfg.name == DEV_STACK_NAME {
            stack.link_dev_dir()?;
        }
        Ok(stack)
    }

    pub fn config(&self) -> &StackConfig {
        &self.cfg
    }

    /// `redis://127.0.0.1:PORT`, or `redis://<inside address>:PORT` behind a link; for a
    /// cluster, `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&...` with every node as a seed.
    pub fn redis_url(&self) -> String {
        match &self.cluster {
            Some(c) => {
                let ports = c.ports();
                let seeds: Vec<String> = ports[1..]
                    .iter()
                    .map(|p| format!("node=127.0.0.1:{p}"))
                    .collect();
                format!("redis-cluster://127.0.0.1:{}?{}", ports[0], seeds.join("&"))
            }
            None => format!("redis://{}", self.redis_addr()),
        }
    }

    /// The cluster's nodes as `127.0.0.1:PORT,...` (`REDIS_CLUSTER_NODES`); `None` without one.
    pub fn redis_cluster_nodes(&self) -> Option<String> {
        let c = self.cluster.as_ref()?;
        let nodes: Vec<String> = c.ports().iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Some(nodes.join(","))
    }

    /// The cluster as its running nodes see it (`CLUSTER NODES`): which port is a primary, its
    /// slots, which are replicas of which, which are marked failed.
    pub fn cluster_topology(&mut self) -> Result<Vec<cluster::ClusterNode>> {
        match &mut self.cluster {
            Some(c) => c.topology(),
            None => bail!("stack {:?} runs no Redis Cluster", self.cfg.name),
        }
    }

    /// SIGKILLs one cluster node, as in a crash (its replica, if it was a primary, takes over
    /// after the node timeout); waits for it to exit.
    pub fn kill_cluster_node(&mut self, port: u16) -> Result<()> {
        match &mut self.cluster {
            Some(c) => c.node_mut(port)?.kill(),
            None => bail!("stack {:?} runs no Redis Cluster", self.cfg.name),
        }
    }

    /// Starts a killed cluster node again (it rejoins, as a replica if it was failed over), and
    /// waits until the cluster is whole again.
    pub fn start_cluster_node(&mut self, port: u16) -> Result<()> {
        match &mut self.cluster {
            Some(c) => {
                c.node_mut(port)?.start()?;
                c.wait_ready()
            }
            None => bail!("stack {:?} runs no Redis Cluster", self.cfg.name),
        }
    }

    /// Where Redis listens: 127.0.0.1:PORT, or the inside end of its [`NetLink`].
    pub fn redis_addr(&self) -> SocketAddr {
        SocketAddr::from((self.redis.bind, self.cfg.redis_port))
    }

    /// The link in front of Redis or Postgres, for stacks started with
    /// [`Stack::start_behind_link`].
    pub fn link(&self) -> Option<&NetLink> {
        self.link.as_ref()
    }

    /// `postgres://floodgate@127.0.0.1:PORT/floodgate` (trust auth on loopback), or at the
    /// inside address of the link Postgres runs behind.
    pub fn database_url(&self) -> String {
        format!(
            "postgres://{}@{}:{}/{}",
            pg::PG_USER,
            self.pg.listen,
            self.cfg.pg_port,
            pg::PG_DATABASE
        )
    }

    /// `/var/tmp/floodgate-<hash>/<name>`: `pg/`, `redis/`, and the logs.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Clean shutdown (`pg_ctl stop -m fast`); returns once the server has exited.
    pub fn stop_postgres(&mut self) -> Result<()> {
        if !self.pg_running {
            bail!("PostgreSQL is not running");
        }
        self.pg.stop()?;
        self.pg_running = false;
        Ok(())
    }

    /// Starts Postgres again on the same data directory and port; returns once it answers.
    pub fn start_postgres(&mut self) -> Result<()> {
        if self.pg_running {
            return Ok(());
        }
        self.pg.start()?;
        self.pg_running = true;
        Ok(())
    }

    /// SIGKILLs redis-server, as in a crash (at most the last second of writes is lost with
    /// appendfsync everysec), and waits for it to exit.
    pub fn kill_redis(&mut self) -> Result<()> {
        self.redis.kill()
    }

    /// Starts redis-server again from the same directory (it reloads its AOF); returns once it
    /// answers PING.
    pub fn start_redis(&mut self) -> Result<()> {
        self.redis.start()
    }

    /// Whether the Redis child is still alive.
    pub fn redis_running(&mut self) -> bool {
        self.redis.is_running()
    }

    /// Stops Redis and Postgres. Safe to call more than once.
    pub fn stop(&mut self) {
        self.redis.stop();
        if let Some(c) = &mut self.cluster {
            c.stop();
        }
        if self.pg_running {
            if let Err(e) = self.pg.stop() {
                eprintln!(
                    "devstack: stopping PostgreSQL of {:?}: {e:#}",
                    self.cfg.name
                );
            }
            self.pg_running = false;
        }
    }

    /// `<checkout>/.dev/state -> /var/tmp/floodgate-<hash>/dev`, so the dev logs are easy to find.
    fn link_dev_dir(&self) -> Result<()> {
        let dev_dir = dev_dir()?;
        fs::create_dir_all(&dev_dir)?;
        let link = dev_dir.join("state");
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&self.state_dir, &link)
            .with_context(|| format!("linking {}", link.display()))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop()
    }
}

/// A port that was free a moment ago on 127.0.0.1 (bind to port 0, read it, close). Never hands
/// out the same port twice in one process, so two calls make a Redis and a Postgres port.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            // Binding loopback port 0 only fails when the machine is out of ports or sockets;
            // nothing in a dev stack can work then.
            .expect("binding 127.0.0.1:0");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Makes sure the tools are there: installs redis-server with apt when it is missing (as root:
/// `apt-get update` once, then `apt-get install -y redis-server`); PostgreSQL 15 must already be
/// installed.
pub fn ensure_installed() -> Result<()> {
    let pg_tools = [
        Path::new(pg::PG_BIN_DIR).join("initdb"),
        Path::new(pg::PG_BIN_DIR).join("pg_ctl"),
        PathBuf::from(pg::PSQL),
    ];
    for tool in &pg_tools {
        if !tool.exists() {
            bail!(
                "{} is missing: install PostgreSQL 15 (Debian: apt-get install postgresql-15)",
                tool.display()
            );
        }
    }

    if install_missing(&[("redis-server", "redis-server")])? {
        stop_system_redis();
    }
    Ok(())
}

/// Makes sure `haproxy` is there: installs Debian's package with apt when missing and we are
/// root.
pub fn ensure_haproxy() -> Result<()> {
    install_missing(&[("haproxy", "haproxy")])?;
    Ok(())
}

/// Makes sure `ip` (iproute2) and `nft` (nftables), which [`NetLink`] runs, are there:
/// installs them with apt when missing and we are root.
pub fn ensure_net_tools() -> Result<()> {
    install_missing(&[("ip", "iproute2"), ("nft", "nftables")])?;
    Ok(())
}

/// Installs the package of each (command, package) whose command is not on PATH (as root:
/// `apt-get update` once per process, then `apt-get install -y`). True if it installed any.
fn install_missing(tools: &[(&str, &str)]) -> Result<bool> {
    static INSTALLING: Mutex<()> = Mutex::new(());
    static APT_UPDATED: AtomicBool = AtomicBool::new(false);

    let _guard = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !in_path(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let list = missing.join(" ");
    if !sys::is_root() {
        bail!("{list} missing: install with `sudo apt-get install -y {list}`");
    }
    eprintln!("devstack: installing {list} with apt-get");
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        apt_get(&["update", "-q"])?;
    }
    let mut args = vec!["install", "-y", "-q"];
    args.extend(&missing);
    apt_get(&args)?;
    for (command, package) in tools {
        if !in_path(command) {
            bail!("apt-get installed {package}, but `{command}` is still not on PATH");
        }
    }
    Ok(true)
}

/// The checkout this devstack belongs to: the workspace it was built in if that still exists,
/// else the nearest directory above the current one whose Cargo.toml has `[workspace]`.
pub fn workspace_root() -> Result<PathBuf> {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf);
    if let Some(root) = built_in.filter(|r| r.join("Cargo.toml").is_file()) {
        return root
            .canonicalize()
            .with_context(|| format!("resolving {}", root.display()));
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    for dir in cwd.ancestors() {
        let manifest = dir.join("Cargo.toml");
        if fs::read_to_string(&manifest)
            .map(|s| s.contains("[workspace]"))
            .unwrap_or(false)
        {
            return Ok(dir.canonicalize()?);
        }
    }
    bail!(
        "can't find the Floodgate checkout (no Cargo.toml with [workspace] above {})",
        cwd.display()
    )
}

/// `<checkout>/.dev`: the dev stack's env file, pid file and a link to its state.
pub fn dev_dir() -> Result<PathBuf> {
    Ok(workspace_root()?.join(".dev"))
}

/// `/var/tmp/floodgate-<first 12 hex digits of sha256(canonical checkout path)>`.
pub fn state_root() -> Result<PathBuf> {
    let root = workspace_root()?;
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    let hash = hex::encode(digest);
    Ok(Path::new(STATE_BASE).join(format!("floodgate-{}", &hash[..12])))
}

fn is_throwaway(name: &str) -> bool {
    name.starts_with("test") || name.starts_with("fault")
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("stack name {name:?}: use letters, digits, '-', '_' and '.' (not leading)");
    }
    Ok(())
}

/// Creates `dir` with mode 0755 whatever the umask, so the `postgres` user can pass through it.
fn create_traversable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o755 != 0o755 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} traversable", dir.display()))?;
    }
    Ok(())
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn apt_get(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Debian's package may start the system service on 6379 as it installs; we run our own
/// instances, and the service would take the dev stack's default port.
fn stop_system_redis() {
    sys::kill_stale(Path::new("/run/redis/redis-server.pid"), "redis-server");
}
