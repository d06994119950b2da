//! A server we start in the background and leave running (Prometheus, moto): its pid and log in
//! a directory of ours, ready once a path answers 200, stopped by TERM then KILL.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{ensure_port_free, http_status, pid_alive, read_pid, signal, wait_ready};
use crate::ServerError;

#[derive(Debug, Clone)]
pub(crate) struct Daemon {
    pub name: &'static str,
    pub dir: PathBuf,
    pub port: u16,
    /// Answers 200 once the server serves.
    pub ready_path: &'static str,
}

impl Daemon {
    fn pidfile(&self) -> PathBuf {
        self.dir.join(format!("{}.pid", self.name))
    }

    pub fn logfile(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Spawns `command` (its own process group, output to the log) and waits until it is ready.
    pub fn start(&self, mut command: Command) -> Result<(), ServerError> {
        if self.is_running() {
            return Ok(());
        }
        ensure_port_free(self.port)?;
        std::fs::create_dir_all(&self.dir).map_err(ServerError::io(&self.dir))?;
        let log = std::fs::File::create(self.logfile()).map_err(ServerError::io(self.logfile()))?;
        use std::os::unix::process::CommandExt;
        // A spawn fails for the program's sake (a wrong TALLY_MOTO_SERVER, say), so name it.
        let program = PathBuf::from(command.get_program());
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(ServerError::io(self.logfile()))?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(ServerError::io(program))?;
        std::fs::write(self.pidfile(), child.id().to_string())
            .map_err(ServerError::io(self.pidfile()))?;
        let pid = child.id();
        wait_ready(
            &format!("{} on port {}", self.name, self.port),
            &self.logfile(),
            Duration::from_secs(30),
            || self.ready(),
            || pid_alive(pid),
        )
    }

    fn ready(&self) -> bool {
        http_status(&format!("127.0.0.1:{}", self.port), self.ready_path) == Some(200)
    }

    pub fn pid(&self) -> Option<u32> {
        read_pid(&self.pidfile())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_cannot_be_spawned_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon {
            name: "moto",
            dir: dir.path().join("moto"),
            port: crate::free_port(),
            ready_path: "/",
        };
        let missing = dir.path().join("no-such-moto_server");
        let err = daemon.start(Command::new(&missing)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}: ", missing.display())),
            "{err}"
        );
        assert!(!daemon.is_running());
    }
}
