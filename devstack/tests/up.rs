//! `devstack up --instances 2`, the body of `./dev up --instances 2`, run as a user runs it (with
//! the debug server binaries): it comes up behind HAProxy, writes the instances into its env
//! file, serves the API and the fan pages through HAProxy, and Ctrl-C stops every process it
//! started. Named `fault_*`: `./dev test` runs it in its serial phase, beside the other stacks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use devstack::{free_port, http, sys};

const PATIENCE: Duration = Duration::from_secs(180);

fn get(url: &str, path: &str) -> Option<u16> {
    let port: u16 = url.rsplit(':').next()?.parse().ok()?;
    http::request(port, "GET", path, &[], None, Duration::from_secs(10))
        .ok()
        .map(|r| r.status)
}

/// `KEY=value` lines (devstack quotes only values that need it; none of these do).
fn read_env(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

#[test]
fn fault_up_with_instances_serves_through_haproxy_and_stops_everything() {
    let bins: PathBuf = Path::new(env!("CARGO_BIN_EXE_devstack"))
        .parent()
        .expect("target/debug")
        .to_path_buf();
    for bin in ["booking-api", "queue-server"] {
        assert!(
            bins.join(bin).is_file(),
            "{bin} is missing: cargo build --workspace --bins"
        );
    }
    let name = "fault-up-instances";
    let env_file = devstack::dev_dir().unwrap().join(format!("env-{name}"));
    let _ = std::fs::remove_file(&env_file);
    let log = std::env::temp_dir().join(format!("{name}-{}.log", std::process::id()));
    let out = std::fs::File::create(&log).unwrap();
    let (booking_port, queue_port) = (free_port(), free_port());
    let mut up = Command::new(env!("CARGO_BIN_EXE_devstack"))
        .args(["up", "--name", name, "--instances", "2"])
        .args(["--redis-port", &free_port().to_string()])
        .args(["--pg-port", &free_port().to_string()])
        .args(["--booking-port", &booking_port.to_string()])
        .args(["--queue-port", &queue_port.to_string()])
        .arg("--booking-bin")
        .arg(bins.join("booking-api"))
        .arg("--queue-bin")
        .arg(bins.join("queue-server"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("devstack up starts");
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Ctrl-C stops")
    {
        if let Some(status) = up.try_wait().unwrap() {
            panic!("devstack up exited ({status}):\n{}", sys::tail(&log, 60));
        }
        assert!(
            Instant::now() < deadline,
            "devstack up did not come up:\n{}",
            sys::tail(&log, 60)
        );
        thread::sleep(Duration::from_millis(250));
    }

    let env = read_env(&env_file);
    let booking = &env["BOOKING_URL"];
    let fan_host = &env["QUEUE_URL"];
    assert_eq!(booking, &format!("http://127.0.0.1:{booking_port}"));
    assert_eq!(fan_host, &format!("http://127.0.0.1:{queue_port}"));
    let instances: Vec<&str> = env["BOOKING_INSTANCE_URLS"]
        .split(',')
        .chain(env["QUEUE_INSTANCE_URLS"].split(','))
        .collect();
    assert_eq!(instances.len(), 4, "{env:?}");
    for url in &instances {
        assert_eq!(get(url, "/readyz"), Some(200), "{url}/readyz");
    }
    // Through HAProxy: both hosts' readiness, the API, the fan pages of both servers.
    let (ga, queue_drop) = (&env["DEMO_DROP_ID"], &env["DEMO_QUEUE_DROP_ID"]);
    for (host, path) in [
        (booking, "/readyz".to_owned()),
        (fan_host, "/readyz".to_owned()),
        (booking, format!("/v1/drops/{ga}")),
        (fan_host, format!("/v1/drops/{ga}")),
        (booking, format!("/drops/{ga}")),
        (fan_host, format!("/drops/{queue_drop}")),
        (fan_host, format!("/drops/{queue_drop}/shop")),
    ] {
        assert_eq!(get(host, &path), Some(200), "{host}{path}");
    }

    // Ctrl-C: everything it started stops, HAProxy and every instance.
    assert!(sys::send_signal(up.id(), "INT"));
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "devstack up did not stop:\n{}",
            sys::tail(&log, 60)
        );
        thread::sleep(Duration::from_millis(250));
    };
    assert!(status.success(), "{status}:\n{}", sys::tail(&log, 60));
    for url in instances
        .iter()
        .copied()
        .chain([booking.as_str(), fan_host.as_str()])
    {
        assert_eq!(get(url, "/healthz"), None, "{url} still answers");
    }
    let _ = std::fs::remove_file(&env_file);
    let _ = std::fs::remove_file(&log);
}
