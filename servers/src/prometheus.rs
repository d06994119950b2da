//! A Prometheus server of our own (Debian's package), on 127.0.0.1 and a port we chose, with its
//! data and configuration in a directory of ours.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{ensure_port_free, http_status, pid_alive, signal, wait_ready};
use crate::redis::which;
use crate::ServerError;

#[derive(Debug, Clone)]
pub struct Prometheus {
    pub dir: PathBuf,
    pub port: u16,
}

impl Prometheus {
    pub fn new(dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            dir: dir.into(),
            port,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the caller writes `prometheus.yml` (and any rule files it names) before `start`.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("prometheus.yml")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("prometheus.pid")
    }

    fn logfile(&self) -> PathBuf {
        self.dir.join("prometheus.log")
    }

    /// `None` when Prometheus is not installed: it is optional for the local stack.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os("TALLY_PROMETHEUS")
            .map(PathBuf::from)
            .or_else(|| which("prometheus"))
    }

    /// Starts it in the background and waits until `/-/ready` answers.
    pub fn start(&self) -> Result<(), ServerError> {
        if self.is_running() {
            return Ok(());
        }
        let bin = Self::binary().ok_or(ServerError::MissingBinary {
            what: "prometheus".into(),
            hint: "install Debian's prometheus package (scripts/setup --prometheus)",
        })?;
        ensure_port_free(self.port)?;
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).map_err(ServerError::io(&data))?;
        let log = std::fs::File::create(self.logfile()).map_err(ServerError::io(self.logfile()))?;
        use std::os::unix::process::CommandExt;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", self.config_file().display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--storage.tsdb.retention.time=2d")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(ServerError::io(self.logfile()))?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(ServerError::io(self.config_file()))?;
        std::fs::write(self.pidfile(), child.id().to_string())
            .map_err(ServerError::io(self.pidfile()))?;
        let pid = child.id();
        wait_ready(
            &format!("prometheus on port {}", self.port),
            &self.logfile(),
            Duration::from_secs(30),
            || self.ready(),
            || pid_alive(pid),
        )
    }

    fn ready(&self) -> bool {
        http_status(&format!("127.0.0.1:{}", self.port), "/-/ready") == Some(200)
    }

    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pidfile())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(pid_alive) && self.ready()
    }

    pub fn stop(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "TERM");
            let start = Instant::now();
            while pid_alive(pid) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(pid) {
                signal(pid, "KILL");
            }
        }
        let _ = std::fs::remove_file(self.pidfile());
    }
}
