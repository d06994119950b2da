//! Fencing a failed primary that runs on this machine: stop it at once, and leave its data
//! directory set to come back as a replica, rewound from the new primary first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ReplicationError;

/// How long a stopped server's postmaster gets to exit.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Stops the server of `data_dir` as `pg_ctl stop -m immediate` does (SIGQUIT to its postmaster)
/// and waits for it to exit. A server that is not running, or a data directory that is not one,
/// is left as it is: the fence marker keeps it from starting as a primary either way.
pub fn stop_now(data_dir: &Path) {
    let Some(pid) = postmaster_pid(data_dir) else {
        return;
    };
    let signalled = std::process::Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !signalled {
        return;
    }
    let deadline = Instant::now() + STOP_WITHIN;
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The postmaster's process id: the first line of `postmaster.pid`.
fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The marker, beside a data directory, that says the server was fenced and must be rewound
/// from the current primary before it starts again.
pub fn fence_marker(data_dir: &std::path::Path) -> PathBuf {
    data_dir.with_extension("fenced")
}

/// Leaves a stopped server set to start as a replica (`standby.signal`), and marked for rewind.
pub fn fence_dir(data_dir: &std::path::Path) -> Result<(), ReplicationError> {
    let io = |e: std::io::Error| ReplicationError::Io(format!("{}: {e}", data_dir.display()));
    std::fs::write(data_dir.join("standby.signal"), b"").map_err(io)?;
    std::fs::write(fence_marker(data_dir), b"fenced by tally replication\n").map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_postmaster_pid_is_the_first_line_of_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(postmaster_pid(dir.path()), None);
        std::fs::write(
            dir.path().join("postmaster.pid"),
            "4242\n/var/lib/x\n1700000000\n5432\n",
        )
        .unwrap();
        assert_eq!(postmaster_pid(dir.path()), Some(4242));
    }

    #[test]
    fn a_fenced_directory_starts_as_a_replica_and_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("pg");
        std::fs::create_dir(&data).unwrap();
        fence_dir(&data).unwrap();
        assert!(data.join("standby.signal").exists());
        assert!(fence_marker(&data).exists());
    }
}
