//! One PostgreSQL 15 cluster: initdb, pg_ctl start/stop/status, and psql for setup queries.
//!
//! Postgres refuses to run as root, so when we are root every server-side tool runs as the
//! `postgres` system user through `runuser`, in directories that user owns.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

use crate::sys;

/// Where Debian puts the PostgreSQL 15 server binaries.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The client; any version talks to a 15 server.
pub const PSQL: &str = "/usr/bin/psql";
/// The superuser initdb creates; trust auth on loopback, so no password.
pub const PG_USER: &str = "floodgate";
/// The database booking-api uses.
pub const PG_DATABASE: &str = "floodgate";
/// How long pg_ctl may take to start or stop the server.
const PG_CTL_TIMEOUT_S: u32 = 60;
const PG_MAX_CONNECTIONS: u32 = 200;
const LOG_TAIL_LINES: usize = 30;

pub(crate) struct Postgres {
    /// The stack's state directory; tools run with it as their working directory because the
    /// postgres user may not be able to enter the caller's (a checkout under a 0700 directory).
    pub state_dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    pub port: u16,
    /// Test and fault stacks trade durability for speed.
    pub fast: bool,
    pub as_postgres_user: bool,
    /// The address it listens on: 127.0.0.1, or the inside end of a [`crate::NetLink`].
    pub listen: Ipv4Addr,
    /// The network namespace it runs in (`ip netns exec`), if not the root one.
    pub netns: Option<String>,
}

pub(crate) enum Status {
    Running,
    Stopped,
    NoCluster,
}

impl Postgres {
    fn tool(&self, name: &str) -> Command {
        let bin = Path::new(PG_BIN_DIR).join(name);
        // [ip netns exec <ns>] [runuser -u postgres --] <bin>
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
        }
        if self.as_postgres_user {
            argv.extend(["runuser", "-u", "postgres", "--"].map(Into::into));
        }
        argv.push(bin.into_os_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.current_dir(&self.state_dir)
            .stdin(Stdio::null())
            // Our own process group: a Ctrl-C at the terminal reaches devstack alone, which
            // then stops the servers in order.
            .process_group(0)
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        cmd
    }

    fn chown(&self, path: &Path, recursive: bool) -> Result<()> {
        if !self.as_postgres_user {
            return Ok(());
        }
        let mut cmd = Command::new("chown");
        if recursive {
            cmd.arg("-R");
        }
        let out = cmd
            .arg("postgres:postgres")
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .context("running chown")?;
        check(&out, &format!("chown postgres {}", path.display()))
    }

    pub fn status(&self) -> Result<Status> {
        if !self.data_dir.join("PG_VERSION").exists() {
            return Ok(Status::NoCluster);
        }
        let out = self
            .tool("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.data_dir)
            .output()
            .context("running pg_ctl status")?;
        Ok(match out.status.code() {
            Some(0) => Status::Running,
            Some(3) => Status::Stopped,
            Some(4) => Status::NoCluster,
            _ => bail!("pg_ctl status failed: {}", output_text(&out)),
        })
    }

    /// Prepares the directories and, unless the data directory already holds a cluster, runs
    /// initdb. A server left running on this data directory by a crashed run is stopped first.
    pub fn prepare(&self) -> Result<()> {
        match self.status()? {
            Status::Running => {
                eprintln!(
                    "devstack: stopping a PostgreSQL left running on {}",
                    self.data_dir.display()
                );
                self.stop()?;
            }
            Status::Stopped => {
                // pg_ctl said no server runs, so a postmaster.pid is stale; remove it so that
                // a recycled pid can't make the new postmaster refuse to start.
                let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
            }
            Status::NoCluster => {}
        }

        fs::create_dir_all(&self.socket_dir)
            .with_context(|| format!("creating {}", self.socket_dir.display()))?;
        self.chown(&self.socket_dir, false)?;
        if !self.log_file.exists() {
            fs::write(&self.log_file, b"")
                .with_context(|| format!("creating {}", self.log_file.display()))?;
        }
        self.chown(&self.log_file, false)?;

        if self.data_dir.join("PG_VERSION").exists() {
            // An earlier run as another user (or a copied state dir) may have left other owners.
            return self.chown(&self.data_dir, true);
        }
        if self.data_dir.exists() {
            // A half-made cluster (initdb interrupted): start over.
            fs::remove_dir_all(&self.data_dir)
                .with_context(|| format!("removing {}", self.data_dir.display()))?;
        }
        fs::create_dir_all(&self.data_dir)?;
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))?;
        self.chown(&self.data_dir, false)?;
        let out = self
            .tool("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-A",
                "trust",
                "-U",
                PG_USER,
                "--encoding=UTF8",
                // Always present, unlike whatever LANG names; byte-order collation is fine here.
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .context("running initdb")?;
        check(&out, "initdb")?;
        if self.listen != Ipv4Addr::LOCALHOST {
            // Clients reach a server behind a link from the root namespace's end of it.
            let hba = self.data_dir.join("pg_hba.conf");
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&hba)
                .with_context(|| format!("opening {}", hba.display()))?;
            writeln!(f, "host all all 10.213.0.0/16 trust")?;
        }
        Ok(())
    }

    fn server_options(&self) -> String {
        // pg_ctl hands -o to a shell: every value here is free of spaces and quotes (the state
        // path is /var/tmp/floodgate-<hex>/<validated name>/pg-sock).
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses={} -c max_connections={PG_MAX_CONNECTIONS}",
            self.port,
            self.socket_dir.display(),
            self.listen
        );
        if self.fast {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        } else {
            opts.push_str(" -c fsync=on");
        }
        opts
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Result<()> {
        let out = self
            .tool("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-s", "-t", &PG_CTL_TIMEOUT_S.to_string()])
            .arg("-o")
            .arg(self.server_options())
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start (port {}) failed: {}\n--- {} ---\n{}",
                self.port,
                output_text(&out),
                self.log_file.display(),
                sys::tail(&self.log_file, LOG_TAIL_LINES)
            );
        }
        // pg_ctl -w has seen the server accept connections; make sure TCP does too.
        self.psql("postgres", "select 1")
            .context("PostgreSQL started but does not answer on TCP")?;
        Ok(())
    }

    /// Stops the server: fast mode (roll back open transactions, clean shutdown); if that
    /// fails, immediate mode.
    pub fn stop(&self) -> Result<()> {
        let fast = self.pg_ctl_stop("fast")?;
        if fast.status.success() {
            return Ok(());
        }
        let immediate = self.pg_ctl_stop("immediate")?;
        if immediate.status.success() {
            return Ok(());
        }
        bail!(
            "pg_ctl stop failed: {} / {}",
            output_text(&fast),
            output_text(&immediate)
        )
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<Output> {
        self.tool("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-s", "-t", &PG_CTL_TIMEOUT_S.to_string()])
            .output()
            .context("running pg_ctl stop")
    }

    /// Runs one SQL command through psql over TCP; returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let out = Command::new(PSQL)
            .args(["-h", &self.listen.to_string(), "-p", &self.port.to_string()])
            .args(["-U", PG_USER, "-d", database])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .process_group(0)
            .output()
            .context("running psql")?;
        check(&out, &format!("psql -c {sql:?}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates the booking database unless it exists.
    pub fn create_database(&self) -> Result<()> {
        let exists = self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"),
        )?;
        if exists != "1" {
            self.psql("postgres", &format!("CREATE DATABASE {PG_DATABASE}"))?;
        }
        Ok(())
    }
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !s.is_empty() {
            s.push_str(" | ");
        }
        s.push_str(stdout.trim());
    }
    format!("{} ({})", s, out.status)
}

fn check(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        bail!("{what} failed: {}", output_text(out))
    }
}
