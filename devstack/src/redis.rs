//! One redis-server, run as our child process (never the system service), appendonly everysec;
//! alone, or as a node of a cluster (`crate::cluster`).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys;

/// How long Redis may take to answer PING after spawning (a big AOF takes a while to load).
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long Redis gets to write its AOF and exit after SIGTERM before it is killed.
const REDIS_STOP_GRACE: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 30;

pub(crate) struct Redis {
    pub dir: PathBuf,
    pub log_file: PathBuf,
    /// Written when spawned, so that a run that died without stopping Redis (SIGKILL, power
    /// loss of the terminal) has its server cleaned up by the next start of the same stack.
    pub pid_file: PathBuf,
    pub port: u16,
    /// The address it listens on: 127.0.0.1, or the inside end of a [`crate::NetLink`].
    pub bind: Ipv4Addr,
    /// The network namespace it runs in (`ip netns exec`), if not the root one.
    pub netns: Option<String>,
    /// A Redis Cluster node (`cluster-enabled yes`, its `nodes.conf` in `dir`), not a lone server.
    pub cluster: bool,
    pub child: Option<Child>,
}

/// How long a cluster node goes unanswered before the others mark it failed and its replica takes
/// over: short, so a failover test (and a dev stack's shard) is back within seconds.
pub(crate) const CLUSTER_NODE_TIMEOUT_MS: u64 = 1_000;

impl Redis {
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Spawns redis-server on the same directory (so it reloads its AOF) and waits for PING.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        // Reap an exited child, if any, before replacing it.
        if let Some(mut old) = self.child.take() {
            let _ = old.wait();
        }
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .with_context(|| format!("opening {}", self.log_file.display()))?;
        let mut command = match &self.netns {
            // `ip netns exec` execs redis-server, so the child's pid is Redis' own.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-server"]);
                c
            }
            None => Command::new("redis-server"),
        };
        if self.cluster {
            command
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args([
                    "--cluster-node-timeout",
                    &CLUSTER_NODE_TIMEOUT_MS.to_string(),
                ])
                // One shard failing over (or down) must not stop the others answering.
                .args(["--cluster-require-full-coverage", "no"])
                // A replica whose link broke a while ago may still be promoted: the drops of its
                // shard are rebuilt from Postgres after a failover anyway (their run id changes).
                .args(["--cluster-replica-validity-factor", "0"]);
        }
        let child = command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", &self.bind.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            // Rewrites are booking-api's to ask for, when Redis is quiet (engine::aof), not
            // Redis' own each time the file doubles, which in a sale is its busiest minutes.
            .args(["--auto-aof-rewrite-percentage", "0"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Our own process group: a Ctrl-C at the terminal reaches devstack alone, which
            // then stops the servers in order.
            .process_group(0)
            .spawn()
            .context("spawning redis-server (is it installed?)")?;
        fs::write(&self.pid_file, child.id().to_string())?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if ping(SocketAddr::from((self.bind, self.port))) {
                return Ok(());
            }
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let _ = fs::remove_file(&self.pid_file);
                    bail!(
                        "redis-server (port {}) exited during start: {status}\n--- {} ---\n{}",
                        self.port,
                        self.log_file.display(),
                        sys::tail(&self.log_file, LOG_TAIL_LINES)
                    );
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "redis-server (port {}) did not answer PING within {:?}\n--- {} ---\n{}",
                    self.port,
                    REDIS_START_TIMEOUT,
                    self.log_file.display(),
                    sys::tail(&self.log_file, LOG_TAIL_LINES)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to flush, as in a crash. Waits for the exit.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("redis-server is not running");
        };
        let _ = child.kill();
        child.wait().context("waiting for redis-server to exit")?;
        let _ = fs::remove_file(&self.pid_file);
        Ok(())
    }

    /// SIGTERM (Redis flushes its AOF and exits), then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sys::terminate_child(&mut child, REDIS_STOP_GRACE);
        }
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// Whether a Redis at `addr` answers `PING` with `+PONG` (not `-LOADING`).
pub fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got += n;
                if buf[..got].ends_with(b"\r\n") {
                    break;
                }
            }
        }
    }
    buf[..got].starts_with(b"+PONG")
}
