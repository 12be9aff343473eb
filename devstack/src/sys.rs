//! Small process and file helpers, std-only (the workspace forbids `unsafe`, so signals go through
//! the `kill` command rather than libc).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Whether this process runs as root (Postgres then has to run as the `postgres` user).
pub fn is_root() -> bool {
    // /proc/self resolves to our /proc/<pid>, which is owned by our effective uid.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Whether a process with this pid exists and has not been reaped.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; only its parent's wait is missing. Field 3 is the state.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// The command line of a live process, arguments joined by spaces ("" if it is gone).
pub fn pid_cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Sends a signal ("TERM", "KILL", "INT") with the `kill` command; false if it could not.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits until a (non-child) process is gone, up to `timeout`; true if it is gone.
pub fn wait_pid_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Stops a child: SIGTERM, up to `grace` to exit, then SIGKILL. Always reaps it.
pub fn terminate_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills a leftover process from an earlier run recorded in `pid_file`, if the pid still runs a
/// command containing `expect` (so a recycled pid is left alone). Removes the pid file.
pub fn kill_stale(pid_file: &Path, expect: &str) {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return;
    };
    if let Ok(pid) = text.trim().parse::<u32>() {
        if pid_alive(pid) && pid_cmdline(pid).contains(expect) {
            eprintln!("devstack: stopping leftover {expect} (pid {pid}) from an earlier run");
            send_signal(pid, "TERM");
            if !wait_pid_gone(pid, Duration::from_secs(10)) {
                send_signal(pid, "KILL");
                wait_pid_gone(pid, Duration::from_secs(5));
            }
        }
    }
    let _ = fs::remove_file(pid_file);
}

/// Whether nothing listens on 127.0.0.1:`port` (binding it succeeds).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The last `lines` lines of a log file (at most the last 64 KiB of it), for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX_TAIL_BYTES: u64 = 64 * 1024;
    let Ok(mut f) = fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
