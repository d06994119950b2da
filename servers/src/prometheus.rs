//! A Prometheus server of our own (Debian's package), on 127.0.0.1 and a port we chose, with its
//! data and configuration in a directory of ours.

use std::path::PathBuf;
use std::process::Command;

use crate::daemon::Daemon;
use crate::redis::find_binary;
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

    fn daemon(&self) -> Daemon {
        Daemon {
            name: "prometheus",
            dir: self.dir.clone(),
            port: self.port,
            ready_path: "/-/ready",
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where the caller writes `prometheus.yml` (and any rule files it names) before `start`.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("prometheus.yml")
    }

    /// `None` when Prometheus is not installed: it is optional for the local stack.
    pub fn binary() -> Option<PathBuf> {
        find_binary("TALLY_PROMETHEUS", "prometheus")
    }

    /// Starts it in the background and waits until `/-/ready` answers.
    pub fn start(&self) -> Result<(), ServerError> {
        let bin = Self::binary().ok_or(ServerError::MissingBinary {
            what: "prometheus".into(),
            hint: "install Debian's prometheus package (scripts/setup --prometheus)",
        })?;
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).map_err(ServerError::io(&data))?;
        let mut command = Command::new(bin);
        command
            .arg(format!("--config.file={}", self.config_file().display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--storage.tsdb.retention.time=2d");
        self.daemon().start(command)
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon().pid()
    }

    pub fn is_running(&self) -> bool {
        self.daemon().is_running()
    }

    pub fn stop(&self) {
        self.daemon().stop()
    }
}
