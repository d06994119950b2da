//! Small process and port helpers shared by the server launchers.

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::ServerError;

/// Are we root? PostgreSQL refuses to run as root, so then its commands run as `postgres`.
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A port that was free a moment ago, for a server to listen on later. Racy by nature; callers
/// still check at bind time.
///
/// Taken from below the kernel's ephemeral range: a port from that range (what binding port 0
/// gives) can meanwhile become the source port of any outgoing connection on the machine, and
/// the server would then fail to bind it.
pub fn free_port() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000u16, ephemeral_start.max(10_100));
    for _ in 0..200 {
        let port = rand::random_range(low..high);
        if port_is_free(port) {
            return port;
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding port 0 on 127.0.0.1")
}

/// How many ports [`on_free_port`] tries.
const PORT_ATTEMPTS: u32 = 3;

/// Runs `start` on a port [`free_port`] saw free, and on another while `start` finds its port
/// taken: anything on the machine (another test's server among them) may take a port between
/// the look and the bind. Other errors are returned at once.
pub fn on_free_port<T>(
    mut start: impl FnMut(u16) -> Result<T, ServerError>,
) -> Result<T, ServerError> {
    let mut attempt = 1;
    loop {
        match start(free_port()) {
            Err(ServerError::PortInUse(_)) if attempt < PORT_ATTEMPTS => attempt += 1,
            done => return done,
        }
    }
}

/// The pid on the first line of a pid file (ours, Redis's, or PostgreSQL's `postmaster.pid`).
pub fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

pub(crate) fn ensure_port_free(port: u16) -> Result<(), ServerError> {
    if port_is_free(port) {
        Ok(())
    } else {
        Err(ServerError::PortInUse(port))
    }
}

/// Runs a command to completion; a non-zero exit becomes an error carrying the last line of its output.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, ServerError> {
    let program = format!("{:?}", cmd.get_program());
    let out = cmd.output().map_err(|e| ServerError::CommandFailed {
        program: program.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return Err(ServerError::CommandFailed {
            program,
            detail: last_line(&text),
        });
    }
    Ok(out)
}

pub(crate) fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

/// The last meaningful line of a log file, for "why did it not start" messages.
pub(crate) fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|t| last_line(&t))
        .unwrap_or_else(|_| "(no log)".into())
}

/// A minimal blocking HTTP GET, for readiness probes without a runtime.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_call(addr, "GET", path)
}

/// Sends `METHOD path` with an empty body to `addr` and returns the status code, if one came.
pub fn http_call(addr: &str, method: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &addr.parse().ok()?,
        std::time::Duration::from_millis(300),
    )
    .ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf[..12]).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// Polls `ready` until it holds; fails early, with the log's last line, once `alive` says the
/// server died (checked after a grace period, since a daemonising server writes its pid late).
pub(crate) fn wait_ready(
    server: &str,
    log: &Path,
    limit: std::time::Duration,
    ready: impl Fn() -> bool,
    alive: impl Fn() -> bool,
) -> Result<(), ServerError> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        if start.elapsed() > std::time::Duration::from_millis(500) && !alive() {
            return Err(ServerError::Crashed {
                server: server.to_owned(),
                detail: log_tail(log),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(ServerError::NotReady {
        server: server.to_owned(),
        seconds: limit.as_secs(),
        detail: log_tail(log),
    })
}

/// A process's state as `/proc/<pid>/stat` gives it (`R`, `S`, `T` when stopped, `Z` a zombie),
/// or `None` when there is no such process. The command name before it is in parentheses and may
/// hold any of them, so the state is read after the last `) `.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Is this process alive (and not a zombie)?
pub fn pid_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z')
}

/// The live processes (pid, command name) whose working directory is under `dir`: PostgreSQL and
/// Redis work in their data directories, so these are the servers started there, also those
/// whose directory has since been removed.
pub fn working_under(dir: &std::path::Path) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if cwd.starts_with(dir) && pid_alive(pid) {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push((pid, name.trim().to_string()));
        }
    }
    found
}

/// Sends a signal by name (`TERM`, `KILL`).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .output();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_has_a_state_and_a_missing_one_none() {
        let me = std::process::id();
        assert!(
            matches!(process_state(me), Some('R' | 'S')),
            "{:?}",
            process_state(me)
        );
        assert!(pid_alive(me));
        assert_eq!(process_state(u32::MAX), None);
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn a_taken_port_is_traded_for_another_and_other_errors_end_the_start() {
        let mut tried = Vec::new();
        let got = on_free_port(|port| {
            tried.push(port);
            if tried.len() == 1 {
                Err(ServerError::PortInUse(port))
            } else {
                Ok(port)
            }
        })
        .unwrap();
        assert_eq!(tried.len(), 2);
        assert_eq!(got, tried[1]);

        let mut calls = 0;
        let err = on_free_port(|port| -> Result<(), _> {
            calls += 1;
            Err(ServerError::PortInUse(port))
        })
        .unwrap_err();
        assert_eq!(calls, PORT_ATTEMPTS);
        assert!(err.to_string().ends_with("is already in use"), "{err}");

        let mut calls = 0;
        let err = on_free_port(|_| -> Result<(), _> {
            calls += 1;
            Err(ServerError::Crashed {
                server: "redis".into(),
                detail: "bad config".into(),
            })
        })
        .unwrap_err();
        assert_eq!(calls, 1, "only a taken port is worth another try");
        assert_eq!(err.to_string(), "redis exited during start-up: bad config");
    }
}
