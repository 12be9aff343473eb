//! A local Redis Cluster: six redis-servers on consecutive ports (`cluster-enabled yes`), three
//! primaries with a replica each, formed with `redis-cli --cluster create`. Each node is a
//! `Redis` child (devstack's redis.rs) like the lone server (appendonly everysec, our process group), in
//! `<state>/redis-cluster/<port>/`. A persistent stack's nodes keep their `nodes.conf`, so the next
//! start re-forms the same cluster instead of creating a new one.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::redis::Redis;
use crate::sys;

/// Nodes of the cluster: three primaries, each with one replica.
pub const CLUSTER_NODE_COUNT: u16 = 6;
/// How long the cluster may take to cover every slot and sync every replica after its nodes start.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// A cluster node's bus listens on its port + this (Redis' fixed offset).
pub const CLUSTER_BUS_PORT_OFFSET: u16 = 10_000;
const LOG_TAIL_LINES: usize = 30;

/// One node as `CLUSTER NODES` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub port: u16,
    pub id: String,
    pub primary: bool,
    /// The primary's node id, for a replica.
    pub replica_of: Option<String>,
    /// Slot ranges `(first, last)` a primary serves.
    pub slots: Vec<(u16, u16)>,
    /// Marked failed (`fail` or `fail?`) by the node asked.
    pub failed: bool,
}

pub(crate) struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// The six nodes, on `first_port .. first_port + 6`, state under `dir`.
    pub fn new(dir: &Path, first_port: u16) -> Result<Cluster> {
        let last = first_port
            .checked_add(CLUSTER_NODE_COUNT - 1 + CLUSTER_BUS_PORT_OFFSET)
            .context("cluster ports: the first port is too high (bus ports are port + 10000)")?;
        debug_assert!(last > first_port);
        let nodes = (0..CLUSTER_NODE_COUNT)
            .map(|i| {
                let port = first_port + i;
                let node_dir = dir.join(port.to_string());
                Redis {
                    log_file: node_dir.join("redis.log"),
                    pid_file: dir.join(format!("redis-{port}.pid")),
                    dir: node_dir,
                    port,
                    bind: Ipv4Addr::LOCALHOST,
                    netns: None,
                    cluster: true,
                    child: None,
                }
            })
            .collect();
        Ok(Cluster { nodes })
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Every port the cluster needs: the nodes' and their buses'.
    pub fn all_ports(&self) -> Vec<u16> {
        let mut ports = self.ports();
        ports.extend(self.ports().iter().map(|p| p + CLUSTER_BUS_PORT_OFFSET));
        ports
    }

    /// Starts every node, forms the cluster if the nodes don't know each other yet, and waits
    /// until every slot is served and every replica has synced with its primary.
    pub fn start(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            node.start()?;
        }
        let known = cluster_info_field(self.nodes[0].port, "cluster_known_nodes")?;
        if known.as_deref() != Some(&CLUSTER_NODE_COUNT.to_string()) {
            self.create()?;
        }
        self.wait_ready()
    }

    fn create(&self) -> Result<()> {
        let addrs: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create (is redis-tools installed?)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Every node running agrees the cluster is `ok` with all 16384 slots assigned, and every
    /// replica's link to its primary is up.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            let mut not_ready = None;
            for node in &mut self.nodes {
                if !node.is_running() {
                    continue;
                }
                if let Some(why) = node_not_ready(node.port) {
                    not_ready = Some(format!("node {}: {why}", node.port));
                    break;
                }
            }
            let Some(why) = not_ready else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                let logs: String = self
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "--- {} ---\n{}\n",
                            n.log_file.display(),
                            sys::tail(&n.log_file, LOG_TAIL_LINES)
                        )
                    })
                    .collect();
                bail!(
                    "the Redis Cluster was not ready within {CLUSTER_READY_TIMEOUT:?} ({why})\n{logs}"
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn node_mut(&mut self, port: u16) -> Result<&mut Redis> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .with_context(|| format!("no cluster node on port {port}"))
    }

    /// The cluster as a running node sees it (`CLUSTER NODES`).
    pub fn topology(&mut self) -> Result<Vec<ClusterNode>> {
        let mut last_err = None;
        for node in &mut self.nodes {
            if !node.is_running() {
                continue;
            }
            match cli(node.port, &["CLUSTER", "NODES"]) {
                Ok(text) => return Ok(parse_cluster_nodes(&text)),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no cluster node is running")))
    }

    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }
}

/// Where a cluster of a test's own can run: the first of six consecutive ports on 127.0.0.1 that
/// are free, with their bus ports 10000 above, from 7200 up to 9000 (below the kernel's ephemeral
/// range, so a bus port can't be taken by an outgoing connection meanwhile). Never the same base
/// twice in one process.
pub fn free_base_port() -> Option<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    (7_200..9_000).step_by(10).find(|base| {
        let free = !handed_out.contains(base)
            && (0..CLUSTER_NODE_COUNT).all(|i| {
                sys::port_is_free(base + i) && sys::port_is_free(base + i + CLUSTER_BUS_PORT_OFFSET)
            });
        if free {
            handed_out.push(*base);
        }
        free
    })
}

/// Why the node isn't serving as part of a ready cluster yet, if it isn't.
fn node_not_ready(port: u16) -> Option<String> {
    let info = match cli(port, &["CLUSTER", "INFO"]) {
        Ok(info) => info,
        Err(e) => return Some(format!("{e:#}")),
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    if field("cluster_state").as_deref() != Some("ok") {
        return Some("cluster_state is not ok".into());
    }
    if field("cluster_slots_assigned").as_deref() != Some("16384") {
        return Some("not every slot is assigned".into());
    }
    let replication = match cli(port, &["INFO", "replication"]) {
        Ok(text) => text,
        Err(e) => return Some(format!("{e:#}")),
    };
    if replication.contains("role:slave") && !replication.contains("master_link_status:up") {
        return Some("replica not synced with its primary".into());
    }
    None
}

fn cluster_info_field(port: u16, name: &str) -> Result<Option<String>> {
    let info = cli(port, &["CLUSTER", "INFO"])?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned()))
}

/// `redis-cli -p PORT ARGS...` against 127.0.0.1: its output, or an error with its stderr.
pub fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running redis-cli (is redis-tools installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.starts_with("ERR") || text.starts_with("Could not connect") {
        bail!(
            "redis-cli -p {port} {}: {}{}",
            args.join(" "),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

/// Reads `CLUSTER NODES` text, one node a line:
/// `<id> <ip:port@bus> <flags> <primary id|-> <ping> <pong> <epoch> <link> <slot>...`.
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split('@').next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                // Slots being moved (`[slot->-id]`) belong to their range until the move ends.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(ClusterNode {
                port,
                id: f[0].to_owned(),
                primary: flags.contains(&"master"),
                replica_of: (f[3] != "-").then(|| f[3].to_owned()),
                slots,
                failed: flags.contains(&"fail") || flags.contains(&"fail?"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7104@17104 slave a1 0 1 1 connected
c3 127.0.0.1:7102@17102 master,fail - 0 1 2 connected 5461-10922 12000 [13->-x]
";
        let nodes = parse_cluster_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].port, 7101);
        assert!(nodes[0].primary && !nodes[0].failed);
        assert_eq!(nodes[0].slots, [(0, 5460)]);
        assert_eq!(nodes[1].replica_of.as_deref(), Some("a1"));
        assert!(!nodes[1].primary);
        assert!(nodes[2].failed);
        assert_eq!(nodes[2].slots, [(5461, 10922), (12000, 12000)]);
    }
}
