//! A Redis server of our own: AOF persistence on, bound to 127.0.0.1 on a port we chose.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{ensure_port_free, pid_alive, read_pid, run, signal, wait_ready};
use crate::{ServerError, TestCa, INSTALL_HINT};

#[derive(Debug, Clone)]
pub struct Redis {
    pub dir: PathBuf,
    pub port: u16,
    pub fsync: Fsync,
    /// When set, the server takes only TLS connections, presenting this CA's server certificate.
    pub tls: Option<TestCa>,
    /// ACL users besides `default` (which keeps every right, for the operator's tools).
    pub users: Vec<AclUser>,
    /// Started for the first time as a replica of the server on this port. Later starts keep
    /// whatever role it had last: Sentinel rewrites its configuration file on a failover.
    pub replica_of: Option<u16>,
}

/// A Redis ACL user: its name, its password, and its rules (`~keys +commands ...`).
#[derive(Debug, Clone)]
pub struct AclUser {
    pub name: String,
    pub password: String,
    pub rules: String,
}

/// When Redis fsyncs its append-only file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Before replying: a `kill -9` or power cut loses nothing acknowledged. Ingest's group
    /// commit puts many votes behind each fsync, which keeps this affordable.
    Always,
    /// Written to the file before replying, fsynced once a second: a `kill -9` of Redis loses
    /// nothing acknowledged (the kernel has the write); an OS crash or power cut may lose the last
    /// second. In production, ingest's `WAIT` for replicas is the stronger guarantee.
    Everysec,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "everysec" => Ok(Fsync::Everysec),
            other => Err(format!(
                "unknown fsync policy {other:?} (always or everysec)"
            )),
        }
    }
}

impl Fsync {
    fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
        }
    }
}

impl Redis {
    pub fn new(dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            dir: dir.into(),
            port,
            fsync: Fsync::Always,
            tls: None,
            users: Vec::new(),
            replica_of: None,
        }
    }

    /// A replica of the server on `primary`, the first time it starts.
    pub fn replica_of(mut self, primary: u16) -> Self {
        self.replica_of = Some(primary);
        self
    }

    /// Takes only TLS connections.
    pub fn with_tls(mut self, ca: TestCa) -> Self {
        self.tls = Some(ca);
        self
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("redis.pid")
    }

    fn logfile(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The configuration file Redis and Sentinel rewrite: what role the server has.
    fn config_file(&self) -> PathBuf {
        self.dir.join("redis.conf")
    }

    pub fn binary() -> Result<PathBuf, ServerError> {
        find_binary("TALLY_REDIS_SERVER", "redis-server").ok_or(ServerError::MissingBinary {
            what: "redis-server".into(),
            hint: INSTALL_HINT,
        })
    }

    /// Starts it in the background, append-only file on, and waits until it answers PING.
    pub fn start(&self) -> Result<(), ServerError> {
        if self.is_running() {
            return Ok(());
        }
        let bin = Self::binary()?;
        ensure_port_free(self.port)?;
        std::fs::create_dir_all(&self.dir).map_err(ServerError::io(&self.dir))?;
        let config = self.config_file();
        if !config.exists() {
            let role = match self.replica_of {
                Some(primary) => format!("replicaof 127.0.0.1 {primary}\n"),
                None => String::new(),
            };
            write_private(
                &config,
                &format!("# Written by Tally; Sentinel and CONFIG REWRITE keep it.\n{role}"),
            )?;
        }
        let mut cmd = Command::new(bin);
        cmd.arg(&config);
        match &self.tls {
            None => cmd.arg("--port").arg(self.port.to_string()),
            Some(ca) => cmd
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(ca.cert_file())
                .arg("--tls-key-file")
                .arg(ca.key_file())
                .arg("--tls-ca-cert-file")
                .arg(ca.ca_file())
                .args(["--tls-auth-clients", "no", "--tls-replication", "yes"]),
        };
        if !self.users.is_empty() {
            let file = self.dir.join("users.acl");
            let mut acl = String::from("user default on nopass ~* &* +@all\n");
            for u in &self.users {
                acl.push_str(&format!("user {} on >{} {}\n", u.name, u.password, u.rules));
            }
            write_private(&file, &acl)?;
            cmd.arg("--aclfile").arg(&file);
        }
        run(cmd
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                self.fsync.as_str(),
                "--save",
                "",
            ])
            .args(["--daemonize", "yes"])
            .arg("--pidfile")
            .arg(self.pidfile())
            .arg("--logfile")
            .arg(self.logfile()))?;
        wait_ready(
            &format!("redis on port {}", self.port),
            &self.logfile(),
            Duration::from_secs(20),
            || self.ping(),
            || self.pid().is_some_and(pid_alive),
        )
    }

    pub fn pid(&self) -> Option<u32> {
        read_pid(&self.pidfile())
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(pid_alive) && self.ping()
    }

    /// Clean stop: `SHUTDOWN` writes and fsyncs the AOF before exiting.
    pub fn stop(&self) -> Result<(), ServerError> {
        let Some(pid) = self.pid() else { return Ok(()) };
        if pid_alive(pid) {
            let _ = self.command("SHUTDOWN");
            if !wait_exit(pid, Duration::from_secs(10)) {
                signal(pid, "KILL");
                wait_exit(pid, Duration::from_secs(5));
            }
        }
        let _ = std::fs::remove_file(self.pidfile());
        Ok(())
    }

    /// `kill -9`, for fault tests.
    pub fn kill(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "KILL");
            wait_exit(pid, Duration::from_secs(5));
        }
    }
}

/// Readable by its owner only: it holds passwords.
fn write_private(path: &Path, text: &str) -> Result<(), ServerError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(ServerError::io(path))
}

fn wait_exit(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A Redis Sentinel: watches the shards it is told of and promotes a replica when a primary is
/// gone, as a managed service's failover does.
#[derive(Debug, Clone)]
pub struct Sentinel {
    pub dir: PathBuf,
    pub port: u16,
    /// The shards it watches: a name and the port of the primary it starts with.
    pub shards: Vec<(String, u16)>,
    /// Sentinels that must agree a primary is down before one fails it over.
    pub quorum: usize,
    /// How long a primary may not answer before it is thought down.
    pub down_after: Duration,
}

impl Sentinel {
    fn config_file(&self) -> PathBuf {
        self.dir.join("sentinel.conf")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("sentinel.pid")
    }

    fn logfile(&self) -> PathBuf {
        self.dir.join("sentinel.log")
    }

    /// Starts it in the background; the configuration is written the first time only, since
    /// Sentinel keeps what it learns (the current primaries, the other sentinels) in it.
    pub fn start(&self) -> Result<(), ServerError> {
        if self.is_running() {
            return Ok(());
        }
        let bin = Redis::binary()?;
        ensure_port_free(self.port)?;
        std::fs::create_dir_all(&self.dir).map_err(ServerError::io(&self.dir))?;
        let config = self.config_file();
        if !config.exists() {
            let mut text = format!(
                "port {}\nbind 127.0.0.1\ndir {}\n",
                self.port,
                self.dir.display()
            );
            for (name, port) in &self.shards {
                text.push_str(&format!(
                    "sentinel monitor {name} 127.0.0.1 {port} {q}\n\
                     sentinel down-after-milliseconds {name} {down}\n\
                     sentinel failover-timeout {name} 10000\n\
                     sentinel parallel-syncs {name} 1\n",
                    q = self.quorum,
                    down = self.down_after.as_millis()
                ));
            }
            write_private(&config, &text)?;
        }
        run(Command::new(bin)
            .arg(&config)
            .arg("--sentinel")
            .args(["--daemonize", "yes"])
            .arg("--pidfile")
            .arg(self.pidfile())
            .arg("--logfile")
            .arg(self.logfile()))?;
        wait_ready(
            &format!("sentinel on port {}", self.port),
            &self.logfile(),
            Duration::from_secs(20),
            || command(self.port, "PING").is_ok_and(|r| r.starts_with("+PONG")),
            || self.pid().is_some_and(pid_alive),
        )
    }

    pub fn pid(&self) -> Option<u32> {
        read_pid(&self.pidfile())
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(pid_alive)
            && command(self.port, "PING").is_ok_and(|r| r.starts_with("+PONG"))
    }

    pub fn stop(&self) {
        if let Some(pid) = self.pid() {
            if pid_alive(pid) {
                signal(pid, "TERM");
                if !wait_exit(pid, Duration::from_secs(5)) {
                    signal(pid, "KILL");
                    wait_exit(pid, Duration::from_secs(5));
                }
            }
        }
        let _ = std::fs::remove_file(self.pidfile());
    }

    /// The port of the primary it names for `shard`, if it names one.
    pub fn primary_port(&self, shard: &str) -> Option<u16> {
        let reply = command(
            self.port,
            &format!("SENTINEL get-master-addr-by-name {shard}"),
        )
        .ok()?;
        // *2\r\n$9\r\n127.0.0.1\r\n$4\r\n6400\r\n
        reply.split("\r\n").nth(4)?.parse().ok()
    }
}

impl Redis {
    /// One command's reply; through `redis-cli` when the server takes only TLS.
    fn command(&self, cmd: &str) -> std::io::Result<String> {
        let Some(ca) = &self.tls else {
            return command(self.port, cmd);
        };
        let out = Command::new(which("redis-cli").ok_or(std::io::ErrorKind::NotFound)?)
            .args(["--tls", "--cacert"])
            .arg(ca.ca_file())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), cmd])
            .output()?;
        Ok(format!("+{}", String::from_utf8_lossy(&out.stdout).trim()))
    }

    fn ping(&self) -> bool {
        self.command("PING").is_ok_and(|r| r.starts_with("+PONG"))
    }
}

/// A section of `INFO` from the Redis server (or sentinel) on `port`.
pub fn redis_info(port: u16, section: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("INFO {section}\r\n").as_bytes())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        // `$<len>\r\n<len bytes>\r\n`: done once all of it is here.
        let text = String::from_utf8_lossy(&reply);
        if let Some((head, body)) = text.split_once("\r\n") {
            let len: usize = head.trim_start_matches('$').parse().map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, head.to_string())
            })?;
            if body.len() >= len {
                return Ok(body[..len].to_string());
            }
        }
    }
    Err(std::io::ErrorKind::UnexpectedEof.into())
}

/// Replicas of the server on `port` online and no more than `behind` bytes of its replication
/// stream behind it (`INFO replication`).
pub fn replicas_in_sync(port: u16, behind: u64) -> usize {
    let Ok(info) = redis_info(port, "replication") else {
        return 0;
    };
    let field = |line: &str, name: &str| {
        line.split([',', ':'])
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
    };
    let Some(own) = info
        .lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|o| o.trim().parse::<u64>().ok())
    else {
        return 0;
    };
    info.lines()
        .filter(|l| l.starts_with("slave"))
        .filter(|l| field(l, "state=").as_deref() == Some("online"))
        .filter_map(|l| field(l, "offset=")?.parse::<u64>().ok())
        .filter(|&offset| own.saturating_sub(offset) <= behind)
        .count()
}

fn command(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The program `$env` names, else `name` on the PATH.
pub(crate) fn find_binary(env: &str, name: &str) -> Option<PathBuf> {
    std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| which(name))
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| is_executable(p))
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
