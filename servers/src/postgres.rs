//! A PostgreSQL cluster of our own: a primary made by `initdb`, or a streaming replica made by
//! `pg_basebackup -R` from one. Runs as the `postgres` OS user when we are root (initdb and
//! postgres refuse root), so its directories are handed to that user.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{ensure_port_free, log_tail, run, running_as_root};
use crate::redis::which;
use crate::{ServerError, TestCa, INSTALL_HINT};

/// The OS user PostgreSQL runs as when `tally` runs as root.
const SERVER_USER: &str = "postgres";
/// The database superuser of every cluster we create.
pub const SUPERUSER: &str = "postgres";
/// Seconds `pg_ctl` may wait for a start or stop.
const PG_CTL_WAIT_SECS: u64 = 60;

/// Settings every cluster gets; chosen for a busy write path that replicates and can be rewound.
const CONF: &str = "
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
shared_buffers = '256MB'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '512MB'
wal_log_hints = on
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = '1s'
synchronous_commit = on
checkpoint_timeout = '5min'
max_wal_size = '2GB'
logging_collector = off
log_min_messages = warning
";

/// Trust on loopback only: these servers bind 127.0.0.1 and exist for this machine's user.
const HBA: &str = "
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
";

/// With TLS required: the same trust, but only over TLS; a plain connection is refused by name
/// ("pg_hba.conf rejects connection ... no encryption").
const HBA_TLS_ONLY: &str = "
hostssl all all 127.0.0.1/32 trust
hostssl replication all 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
hostnossl replication all 127.0.0.1/32 reject
";

/// The server's certificate and key, copied into the data directory (where the server user can
/// read them, and where `pg_basebackup` takes them to a replica).
const TLS_CONF: &str = "
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
";

/// Where the PostgreSQL server binaries are.
#[derive(Debug, Clone)]
pub struct PgBin(pub PathBuf);

impl PgBin {
    /// `TALLY_PG_BIN`, else the newest Debian-style `/usr/lib/postgresql/N/bin`, else `PATH`.
    pub fn find() -> Result<Self, ServerError> {
        if let Some(dir) = std::env::var_os("TALLY_PG_BIN") {
            return Self::checked(PathBuf::from(dir));
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions
            .into_iter()
            .rev()
            .find(|(_, d)| d.join("initdb").exists())
        {
            return Self::checked(dir);
        }
        match which("initdb") {
            Some(p) => Self::checked(p.parent().unwrap_or(Path::new("/")).to_path_buf()),
            None => Err(ServerError::MissingBinary {
                what: "PostgreSQL (initdb)".into(),
                hint: INSTALL_HINT,
            }),
        }
    }

    fn checked(dir: PathBuf) -> Result<Self, ServerError> {
        for tool in ["initdb", "pg_ctl", "pg_basebackup", "postgres"] {
            if !dir.join(tool).exists() {
                return Err(ServerError::MissingBinary {
                    what: format!("{}", dir.join(tool).display()),
                    hint: INSTALL_HINT,
                });
            }
        }
        Ok(Self(dir))
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Waits for sessions to end after a checkpoint: nothing to replay on start.
    Fast,
    /// Like a crash (`kill -9` of the postmaster): recovery replays WAL on the next start.
    Immediate,
}

#[derive(Debug, Clone)]
pub struct Postgres {
    pub bin: PgBin,
    pub data_dir: PathBuf,
    pub port: u16,
    /// When set, the server takes only TLS connections, presenting this CA's server certificate.
    pub tls: Option<TestCa>,
}

impl Postgres {
    pub fn new(bin: PgBin, data_dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            bin,
            data_dir: data_dir.into(),
            port,
            tls: None,
        }
    }

    /// Takes only TLS connections (set before [`Postgres::init_primary`]).
    pub fn with_tls(mut self, ca: TestCa) -> Self {
        self.tls = Some(ca);
        self
    }

    pub fn url(&self, user: &str, db: &str) -> String {
        let tls = if self.tls.is_some() {
            "?sslmode=require"
        } else {
            ""
        };
        format!("postgres://{user}@127.0.0.1:{}/{db}{tls}", self.port)
    }

    /// The superuser's URL to the `postgres` database.
    pub fn admin_url(&self) -> String {
        self.url(SUPERUSER, "postgres")
    }

    fn logfile(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    pub fn is_initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }

    /// `initdb` a new primary cluster (nothing is done if one is there already).
    pub fn init_primary(&self) -> Result<(), ServerError> {
        if self.is_initialized() {
            return Ok(());
        }
        self.prepare_dir()?;
        run(self
            .as_server_user(self.bin.tool("initdb"))
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]))?;
        append(&self.data_dir.join("postgresql.conf"), CONF)?;
        let hba = match &self.tls {
            None => HBA,
            Some(ca) => {
                self.install_certificate(ca)?;
                append(&self.data_dir.join("postgresql.conf"), TLS_CONF)?;
                HBA_TLS_ONLY
            }
        };
        std::fs::write(self.data_dir.join("pg_hba.conf"), hba)
            .map_err(ServerError::io(&self.data_dir))?;
        Ok(())
    }

    /// Clone `primary` into a streaming replica with its own replication slot (so the primary
    /// keeps the WAL it has not received yet), streaming from port `via` (the primary's own, or a
    /// link's that leads to it). The primary must be running.
    pub fn init_replica(
        &self,
        primary: &Postgres,
        via: u16,
        slot: &str,
    ) -> Result<(), ServerError> {
        if self.is_initialized() {
            return Ok(());
        }
        self.prepare_dir()?;
        // A slot left by an earlier attempt would make `-C` fail; drop it first.
        let _ = self.psql(
            primary,
            &format!("SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        );
        run(self
            .as_server_user(self.bin.tool("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-R", "-X", "stream", "-C", "-S", slot, "--checkpoint=fast"]))?;
        self.follow(via, slot)
    }

    /// Points this (stopped) replica at the primary on port `via` through `slot`, naming itself
    /// after the slot (the name the primary's `pg_stat_replication` shows).
    fn follow(&self, via: u16, slot: &str) -> Result<(), ServerError> {
        append(
            &self.data_dir.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={via} user={SUPERUSER} application_name={slot}'\nprimary_slot_name = '{slot}'\n",
            ),
        )?;
        std::fs::write(self.data_dir.join("standby.signal"), b"")
            .map_err(ServerError::io(&self.data_dir))
    }

    /// Is this cluster set to start as a replica?
    pub fn is_replica(&self) -> bool {
        self.data_dir.join("standby.signal").exists()
    }

    /// Turns a stopped former primary into a replica of `primary` (which must be running):
    /// `pg_rewind` undoes whatever it wrote that `primary` never received, then it follows
    /// `primary` (on port `via`) through `slot`, created there if missing.
    pub fn rewind(&self, primary: &Postgres, via: u16, slot: &str) -> Result<(), ServerError> {
        // A freshly promoted primary names its new timeline in pg_control only at its next
        // checkpoint; until then pg_rewind sees no divergence and rewinds nothing.
        self.psql(primary, "CHECKPOINT")?;
        // pg_rewind first finishes crash recovery in single-user mode, which refuses standby mode.
        let _ = std::fs::remove_file(self.data_dir.join("standby.signal"));
        run(self
            .as_server_user(self.bin.tool("pg_rewind"))
            .arg("-D")
            .arg(&self.data_dir)
            .arg(format!(
                "--source-server=host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
                primary.port
            )))?;
        self.psql(
            primary,
            &format!("SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"),
        )?;
        self.follow(via, slot)
    }

    /// Runs one statement on `server` as the superuser.
    fn psql(&self, server: &Postgres, sql: &str) -> Result<(), ServerError> {
        let port = server.port.to_string();
        run(self.as_server_user(self.bin.tool("psql")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-qAtc",
            sql,
        ]))?;
        Ok(())
    }

    /// PostgreSQL refuses a key anyone but its owner, the server user, can read.
    fn install_certificate(&self, ca: &TestCa) -> Result<(), ServerError> {
        use std::os::unix::fs::PermissionsExt;
        for (from, to) in [
            (ca.cert_file(), "server.crt"),
            (ca.key_file(), "server.key"),
        ] {
            let to = self.data_dir.join(to);
            std::fs::copy(&from, &to).map_err(ServerError::io(&from))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(ServerError::io(&to))?;
            if running_as_root() {
                run(Command::new("chown")
                    .arg(format!("{SERVER_USER}:"))
                    .arg(&to))?;
            }
        }
        Ok(())
    }

    /// The directory, created and owned by the server user.
    fn prepare_dir(&self) -> Result<(), ServerError> {
        std::fs::create_dir_all(&self.data_dir).map_err(ServerError::io(&self.data_dir))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(ServerError::io(&self.data_dir))?;
        if running_as_root() {
            run(Command::new("chown")
                .args(["-R", &format!("{SERVER_USER}:")])
                .arg(&self.data_dir))?;
            // The log sits beside the data directory and is written by the server user.
            let log = self.logfile();
            std::fs::write(&log, b"").map_err(ServerError::io(&log))?;
            run(Command::new("chown")
                .arg(format!("{SERVER_USER}:"))
                .arg(&log))?;
            // The server user must be able to reach the directory.
            run(self.as_server_user("test").arg("-w").arg(&self.data_dir)).map_err(|_| {
                ServerError::CommandFailed {
                    program: "postgres".into(),
                    detail: format!(
                        "the {SERVER_USER} user cannot reach {}; choose a --dir outside a private home directory",
                        self.data_dir.display()
                    ),
                }
            })?;
        }
        Ok(())
    }

    fn as_server_user(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", SERVER_USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub fn start(&self) -> Result<(), ServerError> {
        if self.is_running() {
            return Ok(());
        }
        ensure_port_free(self.port)?;
        run(self
            .as_server_user(self.bin.tool("pg_ctl"))
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.logfile())
            .args(["-w", "-t", &PG_CTL_WAIT_SECS.to_string()])
            .args(["-o", &format!("-p {}", self.port)])
            .arg("start"))
        .map_err(|e| match e {
            ServerError::CommandFailed { .. } => ServerError::Crashed {
                server: format!("postgres on port {}", self.port),
                detail: log_tail(&self.logfile()),
            },
            other => other,
        })?;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.is_initialized()
            && self
                .as_server_user(self.bin.tool("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .arg("status")
                .output()
                .is_ok_and(|o| o.status.success())
    }

    pub fn stop(&self, mode: StopMode) -> Result<(), ServerError> {
        if !self.is_running() {
            return Ok(());
        }
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        run(self
            .as_server_user(self.bin.tool("pg_ctl"))
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-m",
                mode,
                "-w",
                "-t",
                &PG_CTL_WAIT_SECS.to_string(),
                "stop",
            ]))?;
        Ok(())
    }
}

fn append(path: &Path, text: &str) -> Result<(), ServerError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(ServerError::io(path))
}
