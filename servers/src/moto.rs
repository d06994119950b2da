//! moto's Route53 (PyPI `moto[server]`), on 127.0.0.1 and a port we chose: the local stand-in
//! `tally regions sync` writes the zone to. It keeps records and health checks in memory only.

use std::path::PathBuf;
use std::process::Command;

use crate::daemon::Daemon;
use crate::redis::find_binary;
use crate::ServerError;

#[derive(Debug, Clone)]
pub struct Moto {
    pub dir: PathBuf,
    pub port: u16,
}

impl Moto {
    pub fn new(dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            dir: dir.into(),
            port,
        }
    }

    fn daemon(&self) -> Daemon {
        Daemon {
            name: "moto",
            dir: self.dir.clone(),
            port: self.port,
            ready_path: "/moto-api/data.json",
        }
    }

    /// The endpoint to give the AWS SDK.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `TALLY_MOTO_SERVER`, else `moto_server` on the PATH; `None` when neither is there: moto is
    /// optional for the local stack.
    pub fn binary() -> Option<PathBuf> {
        find_binary("TALLY_MOTO_SERVER", "moto_server")
    }

    pub fn start(&self) -> Result<(), ServerError> {
        let bin = Self::binary().ok_or(ServerError::MissingBinary {
            what: "moto_server".into(),
            hint: "pip install 'moto[server]' (scripts/setup --moto), or set TALLY_MOTO_SERVER",
        })?;
        let mut command = Command::new(bin);
        command.args(["-H", "127.0.0.1", "-p", &self.port.to_string()]);
        self.daemon().start(command)
    }

    pub fn is_running(&self) -> bool {
        self.daemon().is_running()
    }

    pub fn stop(&self) {
        self.daemon().stop()
    }
}
