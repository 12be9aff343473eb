//! The `queue` scenario: the waiting room at scale (the acceptance item for queue-server).
//!
//! 1. **Setup.** A queue drop with the given rate, burst and max_active, created **paused** (or
//!    `--drop-id`, whose settings are overwritten the same way), and N fan tokens from
//!    booking-api's dev identity (`POST /v1/fans/session`).
//! 2. **Baseline** (unless `--no-baseline`): a minimal tokio-tungstenite broadcast server
//!    ([`crate::ws_baseline`]) started as a child process; the client processes open N sockets
//!    to it; its RSS is read before and with all open; a steady phase times each tick from its
//!    `at_ms` to the last socket; the sockets close.
//! 3. **queue-server**, the same way: N sockets (one per fan) to
//!    `/v1/drops/{drop_id}/queue/ws`, each authenticated with its first message
//!    (`{"type":"auth","fan_token":…}`), RSS before / all open / after the steady
//!    phase, tick delivery and exact-position rounds during the steady phase (admission paused,
//!    so every socket stays).
//! 4. **Admission.** Resumed with the ops key; after the burst is spent, admissions over
//!    `--admit-window-s` are counted from the ticks' `admitted_total`, timed by their `at_ms`
//!    (Redis' clock), against the set rate; the admitted fans' places (from their tokens) must
//!    rise from tick to tick.
//!
//! The sockets are held by `--client-procs` child processes of loadtest
//! ([`crate::ws_clients`]), so no process runs into the open-file limit and every socket has a
//! source address with ports to spare.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use indicatif::ProgressBar;
use rand::Rng as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

use crate::api::{create_fan_tokens, AdmissionSettings, QueueDropSpec, Setup};
use crate::cli::{QueueArgs, SocketArgs};
use crate::http::{path_segment, split_base_url, Target};
use crate::procfs::{self, MachineCpu};
use crate::queue_report::{
    self as report, Cpu, Machine, MergedTick, QueueReport, ServerPhase, Settings,
};
use crate::ws_clients::{self, ChildLine, ChildReport, ClientsInit, Counts};

/// After a phase's last measured tick, how long its last frames get to arrive before the
/// sockets close.
const DELIVERY_GRACE: Duration = Duration::from_secs(3);
/// How often the parent looks at its children's progress.
const POLL: Duration = Duration::from_millis(100);
/// Longest wait for every socket to be tried: each is bounded by --connect-timeout-ms, this
/// bounds a client process that hangs.
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(900);
/// How long the client processes get to write their reports after `stop`, and then to exit.
const REPORT_LIMIT: Duration = Duration::from_secs(30);
const EXIT_LIMIT: Duration = Duration::from_secs(5);
/// How long the baseline server gets to bind and say where.
const BASELINE_START_LIMIT: Duration = Duration::from_secs(10);
/// Third octet of the baseline's source addresses: 127.0.(BASELINE_NET_BASE + k).x, apart from
/// queue-server's 127.0.k.x so the baseline's closed sockets (TIME_WAIT) take no port of theirs.
const BASELINE_NET_BASE: u8 = 128;
/// The SKU of a created drop.
const SKU: &str = "LT";

pub(crate) fn wall_ms() -> i64 {
    ws_clients::wall_us() / 1000
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the parent knows of one client process.
#[derive(Debug, Default)]
struct Slot {
    counts: Counts,
    connected: bool,
    report: Option<ChildReport>,
    /// Its stdout closed: it exited.
    ended: bool,
}

/// Where client processes' admissions go (`loadtest sale`: the parent shops for those fans).
pub(crate) type AdmissionSender = tokio::sync::mpsc::UnboundedSender<ws_clients::AdmissionLine>;

/// The client processes of one phase (also `loadtest sale`'s socket fans).
pub(crate) struct Clients {
    procs: Vec<Child>,
    stdins: Vec<ChildStdin>,
    pub(crate) pids: Vec<u32>,
    slots: Arc<Mutex<Vec<Slot>>>,
}

impl Clients {
    /// Starts one client process per init; with `admissions`, their
    /// [`ChildLine::Admission`] lines are passed on there.
    pub(crate) async fn spawn(
        inits: &[ClientsInit],
        admissions: Option<AdmissionSender>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding loadtest's own binary")?;
        let slots = Arc::new(Mutex::new(
            (0..inits.len())
                .map(|_| Slot::default())
                .collect::<Vec<_>>(),
        ));
        let mut clients = Clients {
            procs: Vec::new(),
            stdins: Vec::new(),
            pids: Vec::new(),
            slots,
        };
        for (k, init) in inits.iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("queue-clients")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a client process")?;
            let mut stdin = child.stdin.take().context("client process stdin")?;
            let stdout = child.stdout.take().context("client process stdout")?;
            let mut line = serde_json::to_vec(init)?;
            line.push(b'\n');
            stdin.write_all(&line).await?;
            stdin.flush().await?;
            clients.pids.push(child.id().unwrap_or(0));
            tokio::spawn(read_child(
                k,
                stdout,
                Arc::clone(&clients.slots),
                admissions.clone(),
            ));
            clients.procs.push(child);
            clients.stdins.push(stdin);
        }
        Ok(clients)
    }

    pub(crate) fn counts(&self) -> Counts {
        lock(&self.slots)
            .iter()
            .fold(Counts::default(), |a, s| Counts {
                opened: a.opened + s.counts.opened,
                failed: a.failed + s.counts.failed,
                open: a.open + s.counts.open,
                frames: a.frames + s.counts.frames,
                admitted: a.admitted + s.counts.admitted,
            })
    }

    /// Waits until every client process has tried every socket.
    pub(crate) async fn wait_connected(&self, bar: &ProgressBar) -> anyhow::Result<Counts> {
        let deadline = Instant::now() + CONNECT_PHASE_LIMIT;
        loop {
            let (all, dead) = {
                let s = lock(&self.slots);
                (
                    s.iter().all(|x| x.connected),
                    s.iter().position(|x| x.ended && !x.connected),
                )
            };
            let c = self.counts();
            bar.set_position(c.opened + c.failed);
            bar.set_message(format!("open {} · failed {}", c.open, c.failed));
            if let Some(k) = dead {
                bail!(
                    "client process {k} ended before trying all its sockets (its error is above)"
                );
            }
            if all {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                bail!("sockets still connecting after {CONNECT_PHASE_LIMIT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Tells every client process to stop, collects their reports, waits for them to exit.
    pub(crate) async fn stop(mut self) -> anyhow::Result<Vec<ChildReport>> {
        for stdin in &mut self.stdins {
            // A process that already exited is found below.
            let _ = stdin.write_all(b"stop\n").await;
            let _ = stdin.flush().await;
        }
        self.stdins.clear();
        let deadline = Instant::now() + REPORT_LIMIT;
        while Instant::now() < deadline {
            if lock(&self.slots)
                .iter()
                .all(|s| s.report.is_some() || s.ended)
            {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        for child in &mut self.procs {
            if tokio::time::timeout(EXIT_LIMIT, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
        let mut slots = lock(&self.slots);
        slots
            .iter_mut()
            .enumerate()
            .map(|(k, s)| {
                s.report
                    .take()
                    .with_context(|| format!("client process {k} wrote no report"))
            })
            .collect()
    }
}

async fn read_child(
    k: usize,
    stdout: ChildStdout,
    slots: Arc<Mutex<Vec<Slot>>>,
    admissions: Option<AdmissionSender>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let msg = match serde_json::from_str::<ChildLine>(&line) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("loadtest: client process {k} wrote an unreadable line ({e})");
                continue;
            }
        };
        let mut s = lock(&slots);
        match msg {
            ChildLine::Progress(c) => s[k].counts = c,
            ChildLine::Connected(c) => {
                s[k].counts = c;
                s[k].connected = true;
            }
            ChildLine::Report(r) => {
                s[k].counts = r.counts;
                s[k].report = Some(*r);
            }
            ChildLine::Admission(a) => {
                if let Some(tx) = &admissions {
                    // The receiver goes only when the sale is over: nobody left to shop.
                    let _ = tx.send(a);
                }
            }
        }
    }
    lock(&slots)[k].ended = true;
}

/// `count` fan sessions of run `run_id` (their tokens, in fan order), with a progress bar.
pub(crate) async fn fan_tokens(
    quiet: bool,
    booking: &Target,
    run_id: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let bar = crate::bar(
        quiet,
        count as u64,
        "fans          {bar:30} {pos}/{len} [{elapsed_precise}]",
    );
    let tokens = create_fan_tokens(booking, run_id, count, timeout, &bar).await;
    bar.finish_and_clear();
    tokens
}

/// Which server a phase measures and how its sockets reach it.
struct PhaseSpec<'a> {
    server: &'static str,
    pid: u32,
    target: std::net::SocketAddr,
    url: String,
    /// One fan token per socket; None: plain sockets.
    tokens: Option<&'a [String]>,
    /// Client process k uses source addresses 127.0.(net_base + 1 + k).x.
    net_base: u8,
}

/// Splits the sockets over the client processes.
fn inits(args: &QueueArgs, spec: &PhaseSpec<'_>) -> Vec<ClientsInit> {
    split_inits(
        &args.sockets,
        &Split {
            target: spec.target,
            url: &spec.url,
            tokens: spec.tokens,
            range: (0, args.fans),
            net_base: spec.net_base,
            sale: false,
            connect_per_s: None,
            instances: &[],
        },
    )
}

/// Which sockets a set of client processes holds, and how (`queue`'s phases, `sale`'s fans).
pub(crate) struct Split<'a> {
    pub target: std::net::SocketAddr,
    pub url: &'a str,
    /// One fan token per socket of the whole run (each process takes those of its sockets);
    /// None: plain sockets.
    pub tokens: Option<&'a [String]>,
    /// The run-wide socket (fan) indices `from..to`.
    pub range: (usize, usize),
    /// Process k uses source addresses 127.0.(net_base + 1 + k).x.
    pub net_base: u8,
    /// [`ClientsInit::sale`].
    pub sale: bool,
    /// Sockets started per second by all the processes together, each at its share; None: as
    /// fast as they connect.
    pub connect_per_s: Option<f64>,
    /// [`ClientsInit::instances`].
    pub instances: &'a [(std::net::SocketAddr, String)],
}

/// Splits `split.range` over `sockets.client_procs` processes (fewer when there are fewer
/// sockets), in contiguous runs of fans.
pub(crate) fn split_inits(sockets: &SocketArgs, split: &Split<'_>) -> Vec<ClientsInit> {
    let (from, to) = split.range;
    let n = to.saturating_sub(from);
    let k = sockets.client_procs.min(n);
    let mut first = from;
    (0..k)
        .map(|i| {
            let count = n / k + usize::from(i < n % k);
            let tokens = split
                .tokens
                .map(|t| t[first..first + count].to_vec())
                .unwrap_or_default();
            let init = ClientsInit {
                target: split.target,
                url: split.url.to_owned(),
                tokens,
                count,
                first_fan: first,
                // validate() keeps client_procs ≤ 100, so this stays ≤ 229.
                source_net: split.net_base + 1 + i as u8,
                sockets_per_addr: sockets.sockets_per_addr,
                read_buffer_bytes: sockets.client_read_buffer_bytes,
                connect_concurrency: sockets.connect_concurrency,
                connect_timeout_ms: sockets.connect_timeout_ms,
                sale: split.sale,
                connect_per_s: split.connect_per_s.map(|r| r * count as f64 / n as f64),
                instances: split.instances.to_vec(),
            };
            first += count;
            init
        })
        .collect()
}

/// Sockets open, and what opening them took.
struct Opened {
    clients: Clients,
    took: Opening,
}

/// How long the sockets took to open, and the server's RSS before and with all of them open.
#[derive(Debug, Clone, Copy)]
struct Opening {
    connect_s: f64,
    rss_before_kib: u64,
    rss_open_kib: u64,
    /// Sockets open when `rss_open_kib` was read (the server may have closed some since they
    /// opened).
    open_at_rss: u64,
}

async fn open_sockets(args: &QueueArgs, spec: &PhaseSpec<'_>) -> anyhow::Result<Opened> {
    let rss_before_kib = procfs::vm_rss_kib(spec.pid)?;
    let inits = inits(args, spec);
    let started = Instant::now();
    let clients = Clients::spawn(&inits, None).await?;
    let bar = crate::bar(
        args.quiet,
        args.fans as u64,
        &format!(
            "{:<13} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}] {{msg}}",
            spec.server
        ),
    );
    let counts = clients.wait_connected(&bar).await;
    bar.finish_and_clear();
    let counts = counts?;
    let connect_s = started.elapsed().as_secs_f64();
    crate::note(
        args.quiet,
        format_args!(
            "{}: {} of {} sockets open in {connect_s:.1} s ({} failed)",
            spec.server, counts.opened, args.fans, counts.failed
        ),
    );
    tokio::time::sleep(Duration::from_secs_f64(args.settle_s)).await;
    let rss_open_kib = procfs::vm_rss_kib(spec.pid)?;
    let open_at_rss = clients.counts().open;
    Ok(Opened {
        clients,
        took: Opening {
            connect_s,
            rss_before_kib,
            rss_open_kib,
            open_at_rss,
        },
    })
}

/// Sleeps `secs` with a bar showing the sockets' progress.
async fn wait_with_bar(quiet: bool, label: &str, secs: f64, clients: &Clients) {
    let total_ms = (secs * 1000.0) as u64;
    let bar = crate::bar(
        quiet,
        total_ms,
        &format!("{label:<13} {{bar:30}} [{{elapsed_precise}}] {{msg}}"),
    );
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(secs);
    let mut last = (started, clients.counts().frames);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500).min(end - Instant::now())).await;
        let c = clients.counts();
        let now = Instant::now();
        let per_s = (c.frames - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, c.frames);
        bar.set_position((started.elapsed().as_millis() as u64).min(total_ms));
        bar.set_message(format!(
            "open {} · {per_s:.0} frames/s · admitted {}",
            c.open, c.admitted
        ));
    }
    bar.finish_and_clear();
}

/// The steady phase's window and what it cost.
struct Steady {
    from_ms: i64,
    to_ms: i64,
    rss_end_kib: u64,
    /// Sockets open at the end.
    open_at_end: u64,
    cpu: Cpu,
}

async fn steady_phase(
    args: &QueueArgs,
    spec: &PhaseSpec<'_>,
    clients: &Clients,
    redis_pid: Option<u32>,
) -> Steady {
    let clients_cpu = || clients.pids.iter().map(|p| procfs::cpu_s(*p)).sum::<f64>();
    let (m0, s0, c0, r0) = (
        MachineCpu::now(),
        procfs::cpu_s(spec.pid),
        clients_cpu(),
        redis_pid.map(procfs::cpu_s),
    );
    let started = Instant::now();
    let from_ms = wall_ms();
    wait_with_bar(args.quiet, spec.server, args.steady_s, clients).await;
    let to_ms = wall_ms();
    let elapsed = started.elapsed().as_secs_f64();
    let pct = |cpu_s: f64| cpu_s / elapsed * 100.0;
    let cpu = Cpu {
        machine_busy_pct: m0.busy_since(&MachineCpu::now()) * 100.0,
        server_pct: pct(procfs::cpu_s(spec.pid) - s0),
        clients_pct: pct(clients_cpu() - c0),
        redis_pct: redis_pid.zip(r0).map(|(p, r0)| pct(procfs::cpu_s(p) - r0)),
    };
    Steady {
        from_ms,
        to_ms,
        rss_end_kib: procfs::vm_rss_kib(spec.pid).unwrap_or(0),
        open_at_end: clients.counts().open,
        cpu,
    }
}

fn server_phase(
    spec: &PhaseSpec<'_>,
    sockets: usize,
    took: &Opening,
    steady: &Steady,
    reports: &[ChildReport],
    ticks: &[MergedTick],
    steady_s: f64,
) -> ServerPhase {
    let opened_n: u64 = reports.iter().map(|r| r.counts.opened).sum();
    let failed: u64 = reports.iter().map(|r| r.counts.failed).sum();
    let mut failures = std::collections::BTreeMap::new();
    for (k, v) in reports.iter().flat_map(|r| &r.failures) {
        *failures.entry(k.clone()).or_insert(0) += v;
    }
    let (closed_by_server, read_errors, bad_frames, dropped_records, frames_by_type) =
        report::sum_counters(reports);
    ServerPhase {
        server: spec.server,
        pid: spec.pid,
        sockets,
        opened: opened_n,
        failed,
        failures,
        connect_s: took.connect_s,
        rss_before_kib: took.rss_before_kib,
        rss_open_kib: took.rss_open_kib,
        rss_end_kib: steady.rss_end_kib,
        open_at_rss: took.open_at_rss,
        open_at_end: steady.open_at_end,
        rss_per_socket_kib: report::per_socket_kib(
            took.rss_before_kib,
            took.rss_open_kib,
            opened_n,
        ),
        rss_per_socket_end_kib: report::per_socket_kib(
            took.rss_before_kib,
            steady.rss_end_kib,
            opened_n,
        ),
        steady_s,
        steady: report::delivery(ticks, steady.from_ms, steady.to_ms),
        cpu: steady.cpu.clone(),
        closed_by_server,
        read_errors,
        bad_frames,
        dropped_records,
        frames_by_type,
    }
}

/// The baseline: the same sockets, the same tick, a server that does nothing else.
async fn baseline_phase(args: &QueueArgs, redis_pid: Option<u32>) -> anyhow::Result<ServerPhase> {
    let exe = std::env::current_exe().context("finding loadtest's own binary")?;
    let mut server = Command::new(exe)
        .args([
            "ws-baseline",
            "--listen",
            &args.baseline_listen.to_string(),
            "--interval-ms",
            &args.broadcast_interval_ms.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the baseline server")?;
    let pid = server.id().context("the baseline server's pid")?;
    let stdout = server.stdout.take().context("baseline server stdout")?;
    let line = tokio::time::timeout(BASELINE_START_LIMIT, async {
        BufReader::new(stdout).lines().next_line().await
    })
    .await
    .context("the baseline server didn't start in time")??
    .context("the baseline server exited before listening")?;
    let addr: std::net::SocketAddr = line
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("the baseline server said {line:?}"))?;
    let spec = PhaseSpec {
        server: "baseline",
        pid,
        target: addr,
        url: format!("ws://{addr}/ws"),
        tokens: None,
        net_base: BASELINE_NET_BASE,
    };
    let opened = open_sockets(args, &spec).await?;
    let steady = steady_phase(args, &spec, &opened.clients, redis_pid).await;
    tokio::time::sleep(DELIVERY_GRACE).await;
    let Opened { clients, took } = opened;
    let reports = clients.stop().await;
    let _ = server.start_kill();
    let _ = server.wait().await;
    let reports = reports?;
    let ticks = report::merge_ticks(&reports);
    Ok(server_phase(
        &spec,
        args.fans,
        &took,
        &steady,
        &reports,
        &ticks,
        args.steady_s,
    ))
}

/// The port of `redis://[user:password@]host:port[/db]` (or `host:port`).
pub(crate) fn redis_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let hostport = rest.split('/').next()?;
    let hostport = hostport.rsplit('@').next()?;
    hostport.rsplit_once(':')?.1.parse().ok()
}

/// The `queue` scenario. `Ok(passed)` (always true without `--check`); `Err` for setup failures.
pub async fn run(args: QueueArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.request_timeout_ms);
    let booking = Target::resolve(&args.booking_url).await?;
    let queue = Target::resolve(&args.queue_url).await?;
    let (queue_authority, queue_base_path) = split_base_url(&args.queue_url)?;
    let load_before = procfs::load_average();

    let paused = AdmissionSettings {
        rate_per_s: args.admission.rate_per_s,
        burst: args.admission.burst,
        max_active: args.admission.max_active,
        paused: true,
    };
    let mut setup = Setup::new(booking.clone(), timeout);
    let (drop_id, drop_created) = match &args.drop_id {
        Some(id) => {
            setup.put_admission(&args.ops_key, id, &paused).await?;
            (id.clone(), false)
        }
        None => {
            let now_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let spec = QueueDropSpec {
                name: format!("loadtest queue {now_s}"),
                sku: SKU.into(),
                stock: args.stock,
                per_fan_limit: args.per_fan_limit,
                hold_ttl_s: 600,
                opens_at: None,
                admission: paused,
                shop_window_s: None,
                leave_grace_s: None,
            };
            // validate() made sure the key is there when no drop id is.
            let key = args
                .seller_key
                .as_deref()
                .context("--seller-key is required to create a drop")?;
            (setup.create_drop(key, spec.body()).await?, true)
        }
    };
    let server_pid = match args.server_pid {
        Some(p) => p,
        None => procfs::listener_pid(queue.addr.port())
            .context("finding queue-server's pid (or pass --server-pid)")?,
    };
    let redis_pid = args
        .redis_url
        .as_deref()
        .and_then(redis_port)
        .and_then(|p| procfs::listener_pid(p).ok());
    // Resuming admits the burst at once, then the rate runs through settle, window and grace.
    let settle_s = args.admit_settle_s + args.admission.burst as f64 / args.admission.rate_per_s;
    let needed = args.admission.burst as f64
        + args.admission.rate_per_s
            * (settle_s + args.admit_window_s + DELIVERY_GRACE.as_secs_f64());
    if (args.fans as f64) < needed {
        crate::note(
            args.quiet,
            format_args!(
                "warning: {} fans may run out during the admission window (about {needed:.0} \
                 are admitted): the rate would be measured on an empty line",
                args.fans
            ),
        );
    }
    crate::note(
        args.quiet,
        format_args!(
            "drop {drop_id} (paused); queue-server pid {server_pid}; creating {} fan sessions",
            args.fans
        ),
    );

    let run_id = format!("q{:08x}", rand::rng().random::<u32>());
    let tokens = fan_tokens(args.quiet, &booking, &run_id, args.fans, timeout).await?;

    let baseline = if args.no_baseline {
        None
    } else {
        Some(baseline_phase(&args, redis_pid).await?)
    };

    let spec = PhaseSpec {
        server: "queue-server",
        pid: server_pid,
        target: queue.addr,
        url: format!(
            "ws://{queue_authority}{queue_base_path}/v1/drops/{}/queue/ws",
            path_segment(&drop_id)
        ),
        tokens: Some(&tokens),
        net_base: 0,
    };
    let opened = open_sockets(&args, &spec).await?;
    let steady = steady_phase(&args, &spec, &opened.clients, redis_pid).await;

    // Admission: resume, let the burst go, count over the window. A fresh connection: the setup
    // one has been idle for longer than booking-api keeps idle connections.
    let mut setup = Setup::new(booking.clone(), timeout);
    setup
        .put_admission(
            &args.ops_key,
            &drop_id,
            &AdmissionSettings {
                paused: false,
                ..paused
            },
        )
        .await?;
    let resumed_ms = wall_ms();
    wait_with_bar(
        args.quiet,
        "admitting",
        settle_s + args.admit_window_s + DELIVERY_GRACE.as_secs_f64(),
        &opened.clients,
    )
    .await;
    let admitting_to_ms = wall_ms() - DELIVERY_GRACE.as_millis() as i64;
    let load_after = procfs::load_average();
    // Put the drop back to paused so nothing else moves while the sockets close.
    let _ = setup.put_admission(&args.ops_key, &drop_id, &paused).await;

    let Opened { clients, took } = opened;
    let reports = clients.stop().await?;
    let ticks = report::merge_ticks(&reports);
    let queue_phase = server_phase(
        &spec,
        args.fans,
        &took,
        &steady,
        &reports,
        &ticks,
        args.steady_s,
    );
    let rounds = report::merge_rounds(&reports, ws_clients::ROUND_GAP.as_micros() as i64);
    let admitted: Vec<_> = reports
        .iter()
        .flat_map(|r| r.admitted.iter().cloned())
        .collect();
    let window_start_ms = resumed_ms + (settle_s * 1000.0) as i64;
    let admissions_by_ticks = {
        let at_resume = ticks
            .iter()
            .filter(|t| t.at_ms < resumed_ms)
            .filter_map(|t| t.admitted_total)
            .next_back();
        let last = ticks.iter().filter_map(|t| t.admitted_total).next_back();
        last.unwrap_or(0) - at_resume.unwrap_or(0)
    };
    let mut out = QueueReport {
        scenario: "queue",
        booking_url: args.booking_url.clone(),
        queue_url: args.queue_url.clone(),
        drop_id,
        drop_created,
        fans: args.fans,
        client_procs: args.sockets.client_procs.min(args.fans),
        sockets_per_addr: args.sockets.sockets_per_addr,
        source_addrs: inits(&args, &spec)
            .iter()
            .map(ClientsInit::source_addrs)
            .sum(),
        settings: Settings {
            rate_per_s: args.admission.rate_per_s,
            burst: args.admission.burst,
            max_active: args.admission.max_active,
            stock: args.stock,
            per_fan_limit: args.per_fan_limit,
        },
        machine: Machine {
            cpus: procfs::cpus(),
            cpu_model: procfs::cpu_model(),
            mem_total_kib: procfs::mem_total_kib(),
            load_before,
            load_after,
        },
        queue: queue_phase,
        baseline,
        positions: report::position_rounds(
            &rounds,
            &ticks,
            steady.from_ms,
            steady.to_ms,
            steady.open_at_end,
            report::positions_per_s(&reports, steady.from_ms, steady.to_ms),
        ),
        admitting: report::delivery(&ticks, resumed_ms, admitting_to_ms),
        admission: report::admission(
            &ticks,
            window_start_ms,
            args.admit_window_s,
            args.admission.rate_per_s,
        ),
        admissions_by_ticks,
        order: report::admission_order(&ticks, &admitted),
        checks: Vec::new(),
        passed: false,
    };
    out.checks = report::checks(&out);
    out.passed = out
        .checks
        .iter()
        .all(|c| c.verdict != crate::invariants::Verdict::Fail);
    print!("{}", report::render_text(&out));
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&out).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(out.passed || !args.check)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cli::tests::parse_queue as args;

    #[test]
    fn sockets_and_tokens_split_over_client_processes() {
        let a = args(&[
            "--fans",
            "10",
            "--client-procs",
            "3",
            "--sockets-per-addr",
            "2",
        ]);
        let tokens: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let spec = PhaseSpec {
            server: "queue-server",
            pid: 1,
            target: "127.0.0.1:8081".parse().unwrap(),
            url: "ws://127.0.0.1:8081/v1/drops/d/queue/ws".into(),
            tokens: Some(&tokens),
            net_base: 0,
        };
        let inits = inits(&a, &spec);
        assert_eq!(inits.iter().map(|i| i.count).collect::<Vec<_>>(), [4, 3, 3]);
        assert_eq!(
            inits.iter().map(|i| i.first_fan).collect::<Vec<_>>(),
            [0, 4, 7]
        );
        assert_eq!(inits[1].tokens, ["t4", "t5", "t6"]);
        assert_eq!(
            inits.iter().map(|i| i.source_net).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(inits[0].source_addrs(), 2);
        let plain = PhaseSpec {
            tokens: None,
            net_base: BASELINE_NET_BASE,
            ..spec
        };
        let inits = super::inits(&a, &plain);
        assert!(inits.iter().all(|i| i.tokens.is_empty()));
        assert_eq!(inits[0].source_net, 129);
        // A range of the run's fans (`sale`'s sockets after opening), paced: each its share.
        let paced = split_inits(
            &a.sockets,
            &Split {
                target: plain.target,
                url: &plain.url,
                tokens: Some(&tokens),
                range: (3, 10),
                net_base: 3,
                sale: true,
                connect_per_s: Some(70.0),
                instances: &[],
            },
        );
        let shape: Vec<_> = paced
            .iter()
            .map(|i| (i.first_fan, i.count, i.source_net, i.connect_per_s, i.sale))
            .collect();
        assert_eq!(
            shape,
            [
                (3, 3, 4, Some(30.0), true),
                (6, 2, 5, Some(20.0), true),
                (8, 2, 6, Some(20.0), true)
            ]
        );
        assert_eq!(paced[1].tokens, ["t6", "t7"]);
    }

    #[test]
    fn redis_ports_are_read_from_urls() {
        assert_eq!(redis_port("redis://127.0.0.1:7201"), Some(7201));
        assert_eq!(redis_port("redis://:pw@127.0.0.1:7201/0"), Some(7201));
        assert_eq!(redis_port("127.0.0.1:6379"), Some(6379));
        assert_eq!(redis_port("redis://localhost"), None);
    }
}
