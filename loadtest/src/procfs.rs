//! What the waiting-room scenario reads from Linux's /proc: a process's resident memory and CPU
//! time, the machine's CPU counters and load average, the open-file limit, and which process
//! listens on a TCP port (to find queue-server without being told its pid).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _};

/// `USER_HZ`: the unit of /proc's CPU times. Fixed at 100 by Linux's user-space ABI on every
/// architecture loadtest runs on (sysconf(_SC_CLK_TCK) would need libc and `unsafe`).
pub const CLOCK_TICKS_PER_S: f64 = 100.0;

/// `VmRSS` of `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_field_kib(&text, "VmRSS").with_context(|| format!("no VmRSS in {path}"))
}

/// A `Name:   1234 kB` field of `/proc/<pid>/status`.
fn status_field_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// User + system CPU time `pid` has used, in seconds (0 when it can't be read: the process is
/// gone, and the report says which figures are missing).
pub fn cpu_s(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_cpu_ticks(&s))
        .map_or(0.0, |t| t as f64 / CLOCK_TICKS_PER_S)
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its closing parenthesis.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    // After the name: state (3) … utime is field 14, stime 15; `nth` counts from field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's CPU counters: (busy, total) in ticks, all CPUs summed.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    pub busy: u64,
    pub total: u64,
}

impl MachineCpu {
    pub fn now() -> Self {
        fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some(Self {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// Share of all CPUs busy between `self` and `later`, 0..=1.
    pub fn busy_since(&self, later: &MachineCpu) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        later.busy.saturating_sub(self.busy) as f64 / total as f64
    }
}

/// /proc/loadavg's three load averages.
pub fn load_average() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
    ]
}

/// Online CPUs (lines `processor` in /proc/cpuinfo), at least 1.
pub fn cpus() -> usize {
    fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(1)
        .max(1)
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// MemTotal of /proc/meminfo, in KiB.
pub fn mem_total_kib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| status_field_kib(&s, "MemTotal"))
        .unwrap_or(0)
}

/// This process's soft limit on open files.
pub fn open_files_limit() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The pid of the process listening on TCP `port` (any local address), found through the
/// socket's inode in /proc/net/tcp{,6} and the processes' file descriptors.
pub fn listener_pid(port: u16) -> anyhow::Result<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        bail!("nothing listens on TCP port {port}");
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").context("reading /proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if owns_socket(&entry.path().join("fd"), &targets) {
            return Ok(pid);
        }
    }
    bail!("no process visible here holds the socket listening on port {port}; pass --server-pid")
}

fn owns_socket(fd_dir: &Path, targets: &[String]) -> bool {
    let Ok(fds) = fs::read_dir(fd_dir) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .ok()
            .and_then(|l| l.to_str().map(|s| targets.iter().any(|t| t == s)))
            .unwrap_or(false)
    })
}

/// Inodes of the sockets in state LISTEN (0A) on `port` in a /proc/net/tcp table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            (local.ends_with(&want) && *state == "0A")
                .then(|| inode.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_status() {
        let status = "Name:\tqueue-server\nVmHWM:\t  150000 kB\nVmRSS:\t  123456 kB\nThreads:\t3\n";
        assert_eq!(status_field_kib(status, "VmRSS"), Some(123_456));
        assert_eq!(status_field_kib(status, "VmSwap"), None);
    }

    #[test]
    fn cpu_ticks_skip_a_name_with_spaces() {
        let stat = "42 (queue (server) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn machine_cpu_counts_idle_and_iowait_as_not_busy() {
        let a = MachineCpu::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!((a.busy, a.total), (150, 1000));
        let b = MachineCpu::parse("cpu  200 0 100 850 50 0 0 0 0 0\n").unwrap();
        assert!((a.busy_since(&b) - 150.0 / 200.0).abs() < 1e-9);
    }

    #[test]
    fn listeners_are_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1C24 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5551 1 0 100 0 0 10 0\n\
   1: 0100007F:1C24 0100007F:8000 01 00000000:00000000 00:00000000 00000000     0        0 5552 1 0 100 0 0 10 0\n\
   2: 0100007F:1C25 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5553 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 7204), vec![5551]);
        assert_eq!(listening_inodes(table, 7205), vec![5553]);
        assert_eq!(listening_inodes(table, 7206), Vec::<u64>::new());
    }
}
