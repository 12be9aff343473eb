//! HAProxy (Debian's `haproxy`) in front of several booking-api and queue-server instances:
//! the config it runs with ([`HaproxyConfig::render`]), and one haproxy child process
//! ([`Haproxy`]) started and stopped like `redis` does redis-server.
//!
//! Two frontends, both path-routed over the same two backends (docs/OPERATIONS.md, "Many
//! instances behind HAProxy"):
//! - the booking host (`BOOKING_URL`): booking-api's API, pages and ops routes; the waiting
//!   room's API (`/v1/drops/{id}/queue…`) goes to queue-server, so one host serves all of `/v1`;
//! - the fan host (`QUEUE_URL`): queue-server's pages (the queue page and the shop it hands the
//!   fan to), its API and ops routes, and booking-api's API — so the shop on this origin calls
//!   booking-api on its own origin, with no cross-origin step.
//!
//! Each backend checks `/readyz` every [`CHECK_INTER_MS`] and marks a server down after
//! [`CHECK_FALL`] failures; a request whose connection is refused (a killed instance not yet
//! marked down) is sent again to another server (`option redispatch`, `retry-on conn-failure`:
//! only a request that never reached a server is retried, so a POST is never sent twice).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys;

/// The most client connections one haproxy process takes. Each proxied connection holds two
/// files (the client's socket and the server's) and the process is allowed 20,000 (`ulimit -n`
/// here, and `ulimit-n` in the config), less a few dozen for listeners, health checks and
/// logs: ≈ 9,900 sockets. Past it new connections wait in the kernel's accept backlog. A socket
/// run larger than that connects to the instances directly (`QUEUE_INSTANCE_URLS`).
pub const DEFAULT_HAPROXY_MAXCONN: u32 = 9_900;
/// The file limit HAProxy asks for: two per connection plus room for listeners and checks.
pub const HAPROXY_ULIMIT_N: u32 = 20_000;
/// `/readyz` is checked this often per server ...
pub const CHECK_INTER_MS: u64 = 500;
/// ... and this many failures in a row mark it down (`fall × inter` = 1 s after it stops
/// answering 200), this many successes up again.
pub const CHECK_FALL: u32 = 2;
pub const CHECK_RISE: u32 = 2;
/// How long an instance's `/readyz` must fail on SIGTERM before it stops accepting
/// (`http.drain_unready_ms`, `queue.drain_unready_ms`): HAProxy's `fall × inter`, twice over,
/// so a check that was just under way when the drain began can't keep it up.
pub const DRAIN_UNREADY_MS: u64 = 2 * CHECK_FALL as u64 * CHECK_INTER_MS;
/// The address HAProxy's health checks say they come from (`X-Forwarded-For`): one of their own,
/// so a client that spends 127.0.0.1's per-IP budget can't fail them.
pub const CHECK_CLIENT_ADDR: &str = "127.0.0.2";
/// A WebSocket (after the upgrade, a tunnel) may stay quiet this long: queue-server pings
/// every socket far more often (`queue.ws_ping_interval_ms`).
const TUNNEL_TIMEOUT_S: u64 = 3_600;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 30;

/// What HAProxy serves: its two frontend ports and the instances behind them.
#[derive(Debug, Clone)]
pub struct HaproxyConfig {
    /// The booking host, `BOOKING_URL`.
    pub booking_port: u16,
    /// The fan host, `QUEUE_URL`.
    pub queue_port: u16,
    /// booking-api instances' ports on 127.0.0.1.
    pub booking_instances: Vec<u16>,
    /// queue-server instances' ports on 127.0.0.1.
    pub queue_instances: Vec<u16>,
    pub maxconn: u32,
    /// Where the admin socket goes (`show stat`, `set server … state drain`).
    pub stats_socket: PathBuf,
}

/// The waiting room's API paths, which go to queue-server from either host.
const QUEUE_API_PATH: &str = r"^/v1/drops/[^/]+/queue(/|$)";

impl HaproxyConfig {
    /// The haproxy.cfg text.
    pub fn render(&self) -> String {
        let mut c = String::new();
        let w = &mut c;
        let line = |w: &mut String, s: &str| {
            w.push_str(s);
            w.push('\n');
        };
        line(
            w,
            "# Written by devstack (devstack/src/haproxy.rs); rewritten at every start.",
        );
        line(w, "global");
        line(w, &format!("    maxconn {}", self.maxconn));
        line(w, &format!("    ulimit-n {HAPROXY_ULIMIT_N}"));
        line(
            w,
            &format!(
                "    stats socket {} mode 600 level admin",
                self.stats_socket.display()
            ),
        );
        line(w, "");
        line(w, "defaults");
        line(w, "    mode http");
        // The client's address goes on in X-Forwarded-For; the instances trust 127.0.0.1
        // (`limits.trusted_proxies`), so per-IP limits see fans, not the balancer.
        line(w, "    option forwardfor");
        line(w, "    option redispatch");
        line(w, "    retries 3");
        line(w, "    retry-on conn-failure");
        line(w, "    timeout connect 2s");
        line(w, "    timeout client 30s");
        line(w, "    timeout server 30s");
        line(w, "    timeout http-request 10s");
        line(w, "    timeout http-keep-alive 10s");
        line(w, "    timeout queue 10s");
        line(w, &format!("    timeout tunnel {TUNNEL_TIMEOUT_S}s"));
        line(w, "    timeout client-fin 5s");
        line(
            w,
            &format!(
                "    default-server check inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE}"
            ),
        );
        line(w, "");
        for (name, port, default, other) in [
            ("booking_host", self.booking_port, "booking", None),
            ("fan_host", self.queue_port, "queue", Some("booking")),
        ] {
            line(w, &format!("frontend {name}"));
            line(w, &format!("    bind 127.0.0.1:{port}"));
            line(w, &format!("    maxconn {}", self.maxconn));
            line(w, &format!("    acl queue_api path_reg {QUEUE_API_PATH}"));
            line(w, "    use_backend queue if queue_api");
            if let Some(other) = other {
                // Every other API path is booking-api's.
                line(w, "    acl api path_beg /v1/");
                line(w, &format!("    use_backend {other} if api"));
                // `admitted`'s `booking_url` (`queue.booking_public_url` is this host): the
                // booking page, which takes the admission token from the link, for front ends
                // other than the queue page (which goes to `/drops/{id}/shop`).
                line(w, r"    acl drop_page path_reg ^/drops/[^/]+/?$");
                line(
                    w,
                    "    acl admission_link url_param(admission_token) -m found",
                );
                line(
                    w,
                    &format!("    use_backend {other} if drop_page admission_link"),
                );
            }
            line(w, &format!("    default_backend {default}"));
            line(w, "");
        }
        for (name, ports, balance) in [
            ("booking", &self.booking_instances, "roundrobin"),
            // Sockets live long: a new one goes where the fewest are.
            ("queue", &self.queue_instances, "leastconn"),
        ] {
            line(w, &format!("backend {name}"));
            line(w, &format!("    balance {balance}"));
            line(w, "    option httpchk");
            // The checks come from 127.0.0.1 like every proxied request, which the instances
            // trust; without an address of their own they would share 127.0.0.1's per-IP
            // budget with clients that send no address (a load test), and a 429 would mark
            // every instance down. 127.0.0.2 is not trusted: the checks' own bucket.
            line(
                w,
                &format!(
                    "    http-check send meth GET uri /readyz hdr X-Forwarded-For {CHECK_CLIENT_ADDR}"
                ),
            );
            line(w, "    http-check expect status 200");
            for (i, port) in ports.iter().enumerate() {
                line(
                    w,
                    &format!("    server {} 127.0.0.1:{port}", server_name(name, i)),
                );
            }
            line(w, "");
        }
        c
    }
}

/// A server's name in the config: `booking-1`, `queue-2`, ... (1-based, as `devstack up`
/// numbers the instances).
pub fn server_name(backend: &str, index: usize) -> String {
    format!("{backend}-{}", index + 1)
}

/// One haproxy child process. Dropping it stops it.
pub struct Haproxy {
    pub cfg: HaproxyConfig,
    pub cfg_file: PathBuf,
    pub log_file: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
}

impl Haproxy {
    /// The pid file a run leaves in `state_dir`, for the next start to clean up after a SIGKILL.
    pub fn pid_file(state_dir: &Path) -> PathBuf {
        state_dir.join("haproxy.pid")
    }

    /// Writes `<state_dir>/haproxy.cfg`, checks it (`haproxy -c`), starts haproxy in the
    /// foreground (`-db`) and waits until both frontends accept connections.
    pub fn start(cfg: HaproxyConfig, state_dir: &Path) -> Result<Haproxy> {
        crate::ensure_haproxy()?;
        let pid_file = Haproxy::pid_file(state_dir);
        sys::kill_stale(&pid_file, "haproxy");
        for port in [cfg.booking_port, cfg.queue_port] {
            if !sys::port_is_free(port) {
                bail!("port {port} (for HAProxy) is already in use on 127.0.0.1");
            }
        }
        let cfg_file = state_dir.join("haproxy.cfg");
        let log_file = state_dir.join("haproxy.log");
        fs::write(&cfg_file, cfg.render())
            .with_context(|| format!("writing {}", cfg_file.display()))?;
        let _ = fs::remove_file(&cfg.stats_socket);
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg_file)
            .stdin(Stdio::null())
            .output()
            .context("running haproxy -c (is it installed?)")?;
        if !check.status.success() {
            bail!(
                "haproxy refused {}:\n{}{}",
                cfg_file.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .with_context(|| format!("opening {}", log_file.display()))?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg_file)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Our own process group: a Ctrl-C at the terminal reaches devstack alone.
            .process_group(0)
            .spawn()
            .context("spawning haproxy")?;
        fs::write(&pid_file, child.id().to_string())?;
        let mut haproxy = Haproxy {
            cfg,
            cfg_file,
            log_file,
            pid_file,
            child: Some(child),
        };
        haproxy.wait_ready()?;
        Ok(haproxy)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let up = [self.cfg.booking_port, self.cfg.queue_port]
                .iter()
                .all(|p| accepts(*p));
            if up {
                return Ok(());
            }
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!("haproxy exited during start: {status}\n{}", self.log_tail());
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "haproxy did not accept connections within {START_TIMEOUT:?}\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        format!(
            "--- {} ---\n{}",
            self.log_file.display(),
            sys::tail(&self.log_file, LOG_TAIL_LINES)
        )
    }

    /// Whether the haproxy child still runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Each server's state as HAProxy sees it, from the admin socket's `show stat`:
    /// (backend, server, status) with status `UP`, `DOWN`, `DRAIN`, `MAINT`, or a transition
    /// such as `UP 1/2` (going down) and `DOWN 1/2` (coming up).
    pub fn servers(&self) -> Result<Vec<(String, String, String)>> {
        let text = self.admin("show stat")?;
        let mut rows = Vec::new();
        let mut columns: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(header) = line.strip_prefix("# ") {
                columns = header.split(',').collect();
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            let col = |name: &str| {
                columns
                    .iter()
                    .position(|c| *c == name)
                    .and_then(|i| fields.get(i))
                    .copied()
                    .unwrap_or_default()
            };
            let (backend, server) = (col("pxname"), col("svname"));
            if server.is_empty() || matches!(server, "FRONTEND" | "BACKEND") {
                continue;
            }
            rows.push((
                backend.to_owned(),
                server.to_owned(),
                col("status").to_owned(),
            ));
        }
        Ok(rows)
    }

    /// One server's status (see [`Haproxy::servers`]); `None` if HAProxy has no such server.
    pub fn server_status(&self, backend: &str, server: &str) -> Result<Option<String>> {
        Ok(self
            .servers()?
            .into_iter()
            .find(|(b, s, _)| b == backend && s == server)
            .map(|(_, _, status)| status))
    }

    /// One command on the admin socket (`show stat`, `set server booking/booking-1 state
    /// drain`, ...); its answer.
    pub fn admin(&self, command: &str) -> Result<String> {
        let path = &self.cfg.stats_socket;
        let mut s = UnixStream::connect(path)
            .with_context(|| format!("connecting to HAProxy's admin socket {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .with_context(|| format!("reading HAProxy's answer to {command:?}"))?;
        Ok(out)
    }

    /// SIGTERM (haproxy closes its listeners and connections), then SIGKILL after a grace
    /// period. Safe to call twice.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sys::terminate_child(&mut child, STOP_GRACE);
        }
        let _ = fs::remove_file(&self.pid_file);
        let _ = fs::remove_file(&self.cfg.stats_socket);
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HaproxyConfig {
        HaproxyConfig {
            booking_port: 8080,
            queue_port: 8081,
            booking_instances: vec![18100, 18101],
            queue_instances: vec![18110, 18111],
            maxconn: DEFAULT_HAPROXY_MAXCONN,
            stats_socket: PathBuf::from("/tmp/haproxy.sock"),
        }
    }

    #[test]
    fn config_routes_checks_and_carries_sockets() {
        let text = config().render();
        for want in [
            "maxconn 9900",
            "ulimit-n 20000",
            "option forwardfor",
            "timeout tunnel 3600s",
            "retry-on conn-failure",
            "http-check send meth GET uri /readyz hdr X-Forwarded-For 127.0.0.2",
            "default-server check inter 500ms fall 2 rise 2",
            "bind 127.0.0.1:8080",
            "bind 127.0.0.1:8081",
            "server booking-1 127.0.0.1:18100",
            "server booking-2 127.0.0.1:18101",
            "server queue-1 127.0.0.1:18110",
            "server queue-2 127.0.0.1:18111",
        ] {
            assert!(text.contains(want), "haproxy.cfg lacks {want:?}:\n{text}");
        }
        // The fan host sends booking-api's API to booking-api, everything else to queue-server.
        let fan_host = text
            .split("frontend fan_host")
            .nth(1)
            .and_then(|t| t.split("\n\n").next())
            .expect("a fan_host frontend");
        assert!(fan_host.contains("use_backend queue if queue_api"));
        assert!(fan_host.contains("use_backend booking if api"));
        assert!(fan_host.contains("default_backend queue"));
        assert!(fan_host.contains("use_backend booking if drop_page admission_link"));
    }

    /// Two files per socket under the file limit, with room for listeners and checks.
    #[test]
    fn maxconn_fits_the_file_limit() {
        let reserve = HAPROXY_ULIMIT_N - 2 * DEFAULT_HAPROXY_MAXCONN;
        assert!((100..=500).contains(&reserve), "reserve {reserve}");
    }
}
