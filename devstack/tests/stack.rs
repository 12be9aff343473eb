//! Starts a throwaway stack and puts it through what the fault tests do to theirs. Named
//! `fault_*` so that `./dev test` runs it in its serial phase, not next to the shared stack.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use devstack::{free_port, Stack, StackConfig};

fn redis(port: u16, command: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).expect("read redis reply");
    String::from_utf8_lossy(&buf[..n]).trim().to_string()
}

/// Waits until Redis has written `needle` to its append-only file, which is what a SIGKILL can't
/// take back. With `appendfsync everysec` the write may wait for the background fsync (up to
/// 2 s, longer on a busy machine), so a fixed sleep would be a guess.
fn wait_for_aof(port: u16, needle: &str) {
    // CONFIG GET dir answers `*2 $3 dir $N <dir>`, one per line.
    let reply = redis(port, "CONFIG GET dir");
    let dir = Path::new(reply.lines().last().expect("CONFIG GET dir")).join("appendonlydir");
    let written = || {
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".incr.aof"))
            .any(|e| {
                std::fs::read(e.path())
                    .is_ok_and(|aof| aof.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
    };
    let until = Instant::now() + Duration::from_secs(30);
    while !written() {
        assert!(
            Instant::now() < until,
            "Redis never wrote `{needle}` to {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn fault_stack_restarts() {
    let (redis_port, pg_port) = (free_port(), free_port());
    let mut stack = Stack::start(StackConfig {
        name: "fault-selftest".into(),
        redis_port,
        pg_port,
    })
    .expect("stack starts");
    assert_eq!(stack.redis_url(), format!("redis://127.0.0.1:{redis_port}"));
    let db = stack.database_url();
    assert_eq!(
        db,
        format!("postgres://floodgate@127.0.0.1:{pg_port}/floodgate")
    );
    assert!(stack.state_dir().join("pg").is_dir());

    // Both answer; what Postgres commits and what Redis had for a second survive the restarts.
    assert_eq!(psql(&db, "select 1").unwrap(), "1");
    psql(&db, "create table t (x int); insert into t values (7)").unwrap();
    assert_eq!(redis(redis_port, "PING"), "+PONG");
    assert_eq!(redis(redis_port, "SET survivor yes"), "+OK");
    wait_for_aof(redis_port, "survivor");

    stack.kill_redis().unwrap();
    assert!(TcpStream::connect(("127.0.0.1", redis_port)).is_err());
    stack.start_redis().unwrap();
    assert_eq!(redis(redis_port, "GET survivor"), "$3\r\nyes");

    stack.stop_postgres().unwrap();
    assert!(psql(&db, "select 1").is_err());
    stack.start_postgres().unwrap();
    assert_eq!(psql(&db, "select x from t").unwrap(), "7");

    stack.stop();
    stack.stop(); // idempotent
    assert!(TcpStream::connect(("127.0.0.1", redis_port)).is_err());
    assert!(psql(&db, "select 1").is_err());
    assert!(!stack.state_dir().join("pg/postmaster.pid").exists());
}

/// PING over a socket to `addr`; None if no answer within `patience`.
fn ping_at(addr: std::net::SocketAddr, patience: Duration) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, patience).ok()?;
    s.set_read_timeout(Some(patience)).unwrap();
    s.write_all(b"PING\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

#[test]
fn fault_redis_behind_a_link_partitions_and_heals() {
    let stack = match Stack::start_with_redis_behind_link(StackConfig {
        name: "fault-selftest-link".into(),
        redis_port: free_port(),
        pg_port: free_port(),
    }) {
        Ok(s) => s,
        Err(e) if devstack::is_kernel_refusal(&e) => {
            eprintln!("SKIPPED fault_redis_behind_a_link_partitions_and_heals: {e:#}");
            return;
        }
        Err(e) => panic!("the stack behind a link starts: {e:#}"),
    };
    let link = stack.link().expect("a link");
    let addr = stack.redis_addr();
    assert_eq!(addr.ip(), link.inside_addr());
    assert_eq!(stack.redis_url(), format!("redis://{addr}"));
    let ns = link.namespace().to_owned();
    let patience = Duration::from_secs(2);
    assert_eq!(ping_at(addr, patience).as_deref(), Some("+PONG"));

    // A partition: nothing comes back (no reset either); healing brings Redis back as it was.
    link.partition().unwrap();
    assert_eq!(ping_at(addr, patience), None);
    link.heal().unwrap();
    assert_eq!(ping_at(addr, patience).as_deref(), Some("+PONG"));
    // Total loss is a partition too; 0 % heals.
    link.set_loss(100).unwrap();
    assert_eq!(ping_at(addr, patience), None);
    link.set_loss(0).unwrap();
    assert_eq!(ping_at(addr, patience).as_deref(), Some("+PONG"));

    // The relay adds its delay each way: a round trip through it takes at least twice that.
    let relay =
        devstack::DelayRelay::start(addr, Duration::from_millis(100)).expect("the relay starts");
    let started = std::time::Instant::now();
    assert_eq!(
        ping_at(relay.addr(), Duration::from_secs(10)).as_deref(),
        Some("+PONG")
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    drop(relay);

    // Dropping the stack stops Redis and deletes the namespace with its veth pair.
    drop(stack);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&ns),
        "namespace {ns} left behind"
    );
    assert_eq!(ping_at(addr, Duration::from_millis(500)), None);
}

#[test]
fn fault_postgres_behind_a_link_partitions_and_heals() {
    let stack = match Stack::start_behind_link(
        StackConfig {
            name: "fault-selftest-pglink".into(),
            redis_port: free_port(),
            pg_port: free_port(),
        },
        devstack::BehindLink::Postgres,
    ) {
        Ok(s) => s,
        Err(e) if devstack::is_kernel_refusal(&e) => {
            eprintln!("SKIPPED fault_postgres_behind_a_link_partitions_and_heals: {e:#}");
            return;
        }
        Err(e) => panic!("the stack behind a link starts: {e:#}"),
    };
    let link = stack.link().expect("a link");
    let db = stack.database_url();
    assert!(db.contains(&format!("@{}:", link.inside_addr())), "{db}");
    // Redis stays on loopback.
    assert_eq!(
        ping_at(stack.redis_addr(), Duration::from_secs(2)).as_deref(),
        Some("+PONG")
    );
    let select = || {
        Command::new("psql")
            .args([db.as_str(), "-X", "-q", "-t", "-A", "-c", "select 1"])
            .env("PGCONNECT_TIMEOUT", "2")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(select(), "1");
    link.partition().unwrap();
    assert_eq!(select(), "");
    link.heal().unwrap();
    assert_eq!(select(), "1");
}
