//! booking-api and queue-server as child processes ([`ServerProcess`]: what `devstack up` runs),
//! and several of each behind one HAProxy ([`Fleet`]): what `devstack up --instances N` runs,
//! and what the instance-kill fault test starts and breaks.
//!
//! Every instance gets the caller's shared environment (stores, secrets) and, from here, its
//! own listen port, 127.0.0.1 as trusted proxy (HAProxy's address: per-IP limits then see the
//! `X-Forwarded-For` client, not the balancer), a drain on shutdown long enough for HAProxy to
//! mark it down first ([`haproxy::DRAIN_UNREADY_MS`]), and HAProxy's fan host as the booking-api
//! URL the queue page and the shop call (same origin, no CORS).

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::haproxy::{self, Haproxy, HaproxyConfig};
use crate::{http, sys};

/// How long a server may take to answer `GET /readyz` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server gets after SIGTERM: its drain, then its `shutdown_grace_ms`.
pub const STOP_GRACE: Duration = Duration::from_secs(20);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 40;

/// A booking-api or queue-server child process, logging to `<state>/<name>.log`, its pid in
/// `<state>/<name>.pid` for the next run to clean up after a SIGKILL. Dropping it stops it.
pub struct ServerProcess {
    pub name: String,
    pub port: u16,
    child: Option<Child>,
    pub log_file: PathBuf,
    pid_file: PathBuf,
    /// What it was started with, to start it again ([`ServerProcess::restart`]).
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ServerProcess {
    pub fn pid_file(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join(format!("{name}.pid"))
    }

    /// Starts `bin args` with `env` (added to ours) in a process group of its own.
    pub fn spawn(
        name: &str,
        bin: &Path,
        args: &[&str],
        env: &[(String, String)],
        port: u16,
        state_dir: &Path,
    ) -> Result<ServerProcess> {
        let pid_file = ServerProcess::pid_file(state_dir, name);
        sys::kill_stale(&pid_file, name.split('-').next().unwrap_or(name));
        let mut server = ServerProcess {
            name: name.to_owned(),
            port,
            child: None,
            log_file: state_dir.join(format!("{name}.log")),
            pid_file,
            bin: bin.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env.to_vec(),
        };
        server.launch(false)?;
        Ok(server)
    }

    /// Spawns the process; its log is started afresh, or (`append`) continued.
    fn launch(&mut self, append: bool) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&self.log_file)
            .with_context(|| format!("opening {}", self.log_file.display()))?;
        let mut cmd = Command::new(&self.bin);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Own process group: the terminal's Ctrl-C reaches devstack only, which stops the
            // servers in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        fs::write(&self.pid_file, child.id().to_string())
            .with_context(|| format!("writing {}", self.pid_file.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts it again on the same port with the same binary, arguments and environment (an
    /// upgrade in a rolling deploy replaces the binary at that path first), once the previous
    /// process has exited; its log goes on in the same file.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(child) = &mut self.child {
            if child.try_wait()?.is_none() {
                bail!("{} is still running", self.name);
            }
        }
        self.launch(true)
    }

    /// SIGTERM without waiting: the instance drains (see [`ServerProcess::exited`] for when it
    /// is done).
    pub fn terminate(&self) -> bool {
        self.pid().is_some_and(|pid| sys::send_signal(pid, "TERM"))
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        format!(
            "--- {} ---\n{}",
            self.log_file.display(),
            sys::tail(&self.log_file, LOG_TAIL_LINES)
        )
    }

    /// The exit status, once the process has exited (reaping it).
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} is not running", self.name),
        }
    }

    /// Waits until `GET /readyz` answers 200; `interrupted` is asked between tries.
    pub fn wait_ready(&mut self, interrupted: &dyn Fn() -> bool) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if interrupted() {
                bail!("interrupted while waiting for {}", self.name);
            }
            if let Some(status) = self.exited()? {
                bail!(
                    "{} exited before it was ready ({status})\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(resp) = http::request(self.port, "GET", "/readyz", &[], None, HTTP_TIMEOUT) {
                if resp.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer GET /readyz with 200 within {READY_TIMEOUT:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGKILL, as in a crash; waits for the exit.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("waiting for {} to exit", self.name))?;
        let _ = fs::remove_file(&self.pid_file);
        Ok(())
    }

    /// SIGTERM (the drain, then graceful shutdown), up to [`STOP_GRACE`], then SIGKILL. Safe to
    /// call twice.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sys::terminate_child(&mut child, STOP_GRACE);
        }
        let _ = fs::remove_file(&self.pid_file);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops what an earlier run in `state_dir` left running when it was SIGKILLed: its HAProxy
/// (which holds the frontend ports) and its instances, however many it had.
pub fn stop_leftovers(state_dir: &Path) {
    sys::kill_stale(&Haproxy::pid_file(state_dir), "haproxy");
    let Ok(entries) = fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        for kind in ["booking-api", "queue-server"] {
            if name.starts_with(&format!("{kind}-")) && name.ends_with(".pid") {
                sys::kill_stale(&entry.path(), kind);
            }
        }
    }
}

/// What a [`Fleet`] runs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub booking_bin: PathBuf,
    pub queue_bin: PathBuf,
    /// booking-api and queue-server instances each (at least 1).
    pub instances: usize,
    /// HAProxy's booking host (`BOOKING_URL`) and fan host (`QUEUE_URL`) ports.
    pub booking_port: u16,
    pub queue_port: u16,
    /// What every booking-api instance gets (stores, secrets, identity, limits).
    pub booking_env: Vec<(String, String)>,
    /// What every queue-server instance gets.
    pub queue_env: Vec<(String, String)>,
    /// Logs, pid files, haproxy.cfg and its admin socket go here.
    pub state_dir: PathBuf,
    /// The instances' `http.drain_unready_ms` and `queue.drain_unready_ms`: at least HAProxy's
    /// `fall × inter` ([`haproxy::DRAIN_UNREADY_MS`]).
    pub drain_unready_ms: u64,
}

/// N booking-api and N queue-server processes behind HAProxy. Dropping it stops everything:
/// queue-servers first (their sockets are told 1012), then booking-apis, then HAProxy.
pub struct Fleet {
    pub booking: Vec<ServerProcess>,
    pub queue: Vec<ServerProcess>,
    pub haproxy: Option<Haproxy>,
}

impl Fleet {
    /// Starts the instances on free ports, waits until each is ready, then HAProxy, then waits
    /// until HAProxy has every instance up.
    pub fn start(cfg: &FleetConfig, interrupted: &dyn Fn() -> bool) -> Result<Fleet> {
        if cfg.instances == 0 {
            bail!("--instances must be at least 1");
        }
        fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        stop_leftovers(&cfg.state_dir);
        let mut fleet = Fleet {
            booking: Vec::new(),
            queue: Vec::new(),
            haproxy: None,
        };
        let fan_host = format!("http://127.0.0.1:{}", cfg.queue_port);
        let drain = cfg.drain_unready_ms.to_string();
        let trusted = r#"["127.0.0.1"]"#.to_owned();
        // The first booking-api applies Postgres migrations; the others start once it has.
        for i in 0..cfg.instances {
            let port = crate::free_port();
            let mut env = cfg.booking_env.clone();
            env.push(("FLOODGATE_HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
            env.push(("FLOODGATE_LIMITS__TRUSTED_PROXIES".into(), trusted.clone()));
            env.push(("FLOODGATE_HTTP__DRAIN_UNREADY_MS".into(), drain.clone()));
            let name = haproxy::server_name("booking-api", i);
            eprintln!("devstack: starting {name} on http://127.0.0.1:{port} ...");
            fleet.booking.push(ServerProcess::spawn(
                &name,
                &cfg.booking_bin,
                &["serve"],
                &env,
                port,
                &cfg.state_dir,
            )?);
            if i == 0 {
                fleet.booking[0].wait_ready(interrupted)?;
            }
        }
        for i in 0..cfg.instances {
            let port = crate::free_port();
            let mut env = cfg.queue_env.clone();
            env.push((
                "FLOODGATE_QUEUE__LISTEN".into(),
                format!("127.0.0.1:{port}"),
            ));
            env.push(("FLOODGATE_LIMITS__TRUSTED_PROXIES".into(), trusted.clone()));
            env.push(("FLOODGATE_QUEUE__DRAIN_UNREADY_MS".into(), drain.clone()));
            env.push((
                "FLOODGATE_QUEUE__BOOKING_PUBLIC_URL".into(),
                fan_host.clone(),
            ));
            let name = haproxy::server_name("queue-server", i);
            eprintln!("devstack: starting {name} on http://127.0.0.1:{port} ...");
            fleet.queue.push(ServerProcess::spawn(
                &name,
                &cfg.queue_bin,
                &[],
                &env,
                port,
                &cfg.state_dir,
            )?);
        }
        for server in fleet.booking.iter_mut().chain(fleet.queue.iter_mut()) {
            server.wait_ready(interrupted)?;
        }
        eprintln!(
            "devstack: starting HAProxy on :{} (booking) and :{} (fans) ...",
            cfg.booking_port, cfg.queue_port
        );
        let haproxy = Haproxy::start(
            HaproxyConfig {
                booking_port: cfg.booking_port,
                queue_port: cfg.queue_port,
                booking_instances: fleet.booking.iter().map(|s| s.port).collect(),
                queue_instances: fleet.queue.iter().map(|s| s.port).collect(),
                maxconn: haproxy::DEFAULT_HAPROXY_MAXCONN,
                stats_socket: cfg.state_dir.join("haproxy.sock"),
            },
            &cfg.state_dir,
        )?;
        fleet.haproxy = Some(haproxy);
        fleet.wait_all_up(interrupted)?;
        Ok(fleet)
    }

    /// HAProxy, which [`Fleet::start`] always sets.
    pub fn haproxy(&self) -> Result<&Haproxy> {
        self.haproxy.as_ref().context("HAProxy is not running")
    }

    /// Waits until HAProxy has marked every server of both backends `UP`.
    pub fn wait_all_up(&self, interrupted: &dyn Fn() -> bool) -> Result<()> {
        let haproxy = self.haproxy()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if interrupted() {
                bail!("interrupted while waiting for HAProxy's health checks");
            }
            let servers = haproxy.servers()?;
            if servers.len() == self.booking.len() + self.queue.len()
                && servers.iter().all(|(_, _, status)| status == "UP")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "HAProxy did not mark every instance up within {READY_TIMEOUT:?}: {servers:?}\n{}",
                    haproxy.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// HAProxy's booking host.
    pub fn booking_url(&self) -> Result<String> {
        Ok(format!(
            "http://127.0.0.1:{}",
            self.haproxy()?.cfg.booking_port
        ))
    }

    /// HAProxy's fan host.
    pub fn queue_url(&self) -> Result<String> {
        Ok(format!(
            "http://127.0.0.1:{}",
            self.haproxy()?.cfg.queue_port
        ))
    }

    /// `BOOKING_INSTANCE_URLS`: every booking-api, comma-separated.
    pub fn booking_instance_urls(&self) -> String {
        self.booking
            .iter()
            .map(ServerProcess::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `QUEUE_INSTANCE_URLS`: every queue-server, comma-separated.
    pub fn queue_instance_urls(&self) -> String {
        self.queue
            .iter()
            .map(ServerProcess::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// An instance that exited on its own, with its status and log tail, if any did.
    pub fn exited(&mut self) -> Option<String> {
        for server in self.queue.iter_mut().chain(self.booking.iter_mut()) {
            if let Ok(Some(status)) = server.exited() {
                return Some(format!(
                    "{} exited on its own ({status})\n{}",
                    server.name,
                    server.log_tail()
                ));
            }
        }
        if let Some(h) = &mut self.haproxy {
            if !h.is_running() {
                return Some(format!("haproxy exited on its own\n{}", h.log_tail()));
            }
        }
        None
    }

    /// queue-servers (their sockets are told 1012), booking-apis, then HAProxy. Safe to call
    /// twice.
    pub fn stop(&mut self) {
        // Each group drains at once rather than one instance after another.
        for group in [&mut self.queue, &mut self.booking] {
            for server in group.iter() {
                if let Some(pid) = server.pid() {
                    sys::send_signal(pid, "TERM");
                }
            }
            for server in group.iter_mut() {
                server.stop();
            }
        }
        if let Some(h) = &mut self.haproxy {
            h.stop();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}
