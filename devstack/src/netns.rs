//! A network link the network-fault tests control: a network namespace of the test's own, joined
//! to the root namespace by a veth pair with private addresses (`10.213.k.1` outside, `10.213.k.2`
//! inside, a /30 that exists only on this pair), and nftables rules *inside that namespace* that
//! drop a share of the link's packets (loss) or all of them (a partition: packets vanish, no
//! reset, so a client's socket stays open and hears nothing, the worst case).
//!
//! The servers under test stay in the root namespace and reach what runs inside (Redis or
//! Postgres, see [`crate::Stack::start_behind_link`]) at [`NetLink::inside_addr`]; no rule touches
//! the root namespace's firewall, and no packet leaves the machine.
//!
//! Latency is not added here: `tc netem` needs `CONFIG_NET_SCH_NETEM`, which not every kernel has
//! (the kernel these tests were written on lacks it), so [`crate::DelayRelay`] delays bytes in user space.
//!
//! Where the kernel refuses a step (no permission for namespaces, no veth, no nf_tables), the
//! error is a [`KernelRefused`], which tests turn into a skip with its message; anything else is
//! a failure.

use std::fmt;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::sys;

/// Namespaces this module creates are named `<NS_PREFIX><pid>-<seq>`, so a later run can tell its
/// own leftovers (whose process is gone) from another run's live ones.
const NS_PREFIX: &str = "fgnet-";
/// The interface's name inside the namespace (each namespace has its own interface names).
const INSIDE_IF: &str = "fglink";
/// The nftables table the link's rules live in (inside the namespace only).
const NFT_TABLE: &str = "floodgate_link";

/// The kernel (or the permissions we run with) refused a step: namespaces, veth pairs or
/// nftables are not available here. Tests skip with this message; nothing else is a skip.
#[derive(Debug)]
pub struct KernelRefused(pub String);

impl fmt::Display for KernelRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the kernel refused a network-fault step: {}", self.0)
    }
}

impl std::error::Error for KernelRefused {}

/// Whether an error (anywhere in its chain) is a [`KernelRefused`].
pub fn is_kernel_refusal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<KernelRefused>())
}

/// A namespace + veth pair. Dropping it kills whatever still runs inside and deletes the
/// namespace, which deletes both ends of the pair (also when a test panics).
pub struct NetLink {
    ns: String,
    host_if: String,
    host_addr: Ipv4Addr,
    inside_addr: Ipv4Addr,
}

impl NetLink {
    /// Creates the namespace and the pair, brings both ends up and checks that nftables works
    /// inside. Namespaces left by earlier runs whose process is gone are removed first.
    pub fn create() -> Result<NetLink> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        crate::ensure_net_tools()?;
        remove_stale_namespaces();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let ns = format!("{NS_PREFIX}{pid}-{seq}");
        // IFNAMSIZ is 16 with the NUL: "fg" + up to 7 digits + "h" + a few digits fits.
        let host_if = format!("fg{pid}h{seq}");
        let k = free_subnet(pid + seq)?;
        let host_addr = Ipv4Addr::new(10, 213, k, 1);
        let inside_addr = Ipv4Addr::new(10, 213, k, 2);

        run_ip(&["netns", "add", &ns])?;
        // From here on, an error drops `link`, which deletes the namespace again.
        let link = NetLink {
            ns,
            host_if,
            host_addr,
            inside_addr,
        };
        let ns = link.ns.as_str();
        run_ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            INSIDE_IF,
            "netns",
            ns,
        ])?;
        run_ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &link.host_if,
        ])?;
        run_ip(&["link", "set", &link.host_if, "up"])?;
        run_ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{inside_addr}/30"),
            "dev",
            INSIDE_IF,
        ])?;
        run_ip(&["-n", ns, "link", "set", INSIDE_IF, "up"])?;
        run_ip(&["-n", ns, "link", "set", "lo", "up"])?;
        link.heal()?;
        Ok(link)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The address of the namespace's end of the link: what runs inside listens there.
    pub fn inside_addr(&self) -> Ipv4Addr {
        self.inside_addr
    }

    /// The address of the root namespace's end.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// `ip netns exec <ns> <program>`: a command that runs inside the namespace (`ip` execs the
    /// program, so the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Drops `percent` % of the packets crossing the link, in each direction, at random (0 lets
    /// every packet through, 100 is a partition). TCP sees real loss: retransmissions, stalls.
    pub fn set_loss(&self, percent: u32) -> Result<()> {
        if percent == 0 {
            return self.heal();
        }
        if percent >= 100 {
            // numgen's range is 0..=99: "< 100" is refused, and means a partition anyway.
            return self.partition();
        }
        self.rules(&format!("numgen random mod 100 < {percent} drop"))
    }

    /// Drops every packet crossing the link, both ways: connections stay open and hear nothing,
    /// new ones hang in SYN-SENT, as behind a failed switch.
    pub fn partition(&self) -> Result<()> {
        self.rules("drop")
    }

    /// Lets every packet through again.
    pub fn heal(&self) -> Result<()> {
        self.rules("")
    }

    /// Replaces the namespace's ruleset: `verdict` on every packet in and out of the link.
    fn rules(&self, verdict: &str) -> Result<()> {
        let ruleset = if verdict.is_empty() {
            "flush ruleset\n".to_owned()
        } else {
            format!(
                "flush ruleset\n\
                 table inet {NFT_TABLE} {{\n\
                 \tchain link_in {{ type filter hook input priority 0; policy accept; iifname \"{INSIDE_IF}\" {verdict}; }}\n\
                 \tchain link_out {{ type filter hook output priority 0; policy accept; oifname \"{INSIDE_IF}\" {verdict}; }}\n\
                 }}\n"
            )
        };
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (install nftables)")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output().context("waiting for nft")?;
        check("nft -f -", &out)
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        delete_namespace(&self.ns);
    }
}

impl fmt::Debug for NetLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetLink({} {}/{} <-> {})",
            self.ns, self.host_if, self.host_addr, self.inside_addr
        )
    }
}

/// Kills what still runs in a namespace, then deletes it (its veth pair goes with it).
fn delete_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            sys::send_signal(pid, "KILL");
            sys::wait_pid_gone(pid, Duration::from_secs(5));
        }
    }
    if let Err(e) = run_ip(&["netns", "del", ns]) {
        eprintln!("devstack: deleting network namespace {ns}: {e:#}");
    }
}

/// Namespaces `fgnet-<pid>-<seq>` whose process is gone (a test killed mid-run).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !sys::pid_alive(pid)) {
            eprintln!("devstack: removing network namespace {name} left by an earlier run");
            delete_namespace(name);
        }
    }
}

/// A `k` such that no interface has an address in 10.213.k.0/24, starting from `hint`.
fn free_subnet(hint: u32) -> Result<u8> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .context("running ip addr")?;
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    for i in 0..256u32 {
        let k = ((hint + i) % 256) as u8;
        if !used.contains(&format!(" 10.213.{k}.")) {
            return Ok(k);
        }
    }
    bail!("every 10.213.k.0/24 is taken on this machine")
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (install iproute2)")?;
    check(&format!("ip {}", args.join(" ")), &out)
}

/// An error for a failed command: a [`KernelRefused`] when its message says the kernel or our
/// permissions refused, a plain error otherwise.
fn check(what: &str, out: &std::process::Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let refused = [
        "Operation not permitted",
        "Permission denied",
        "not supported",
        "Unknown device type",
        "Protocol not supported",
    ]
    .iter()
    .any(|m| stderr.contains(m));
    if refused {
        return Err(KernelRefused(format!("`{what}`: {stderr}")).into());
    }
    bail!("`{what}` failed ({}): {stderr}", out.status)
}
