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

/// Is this process alive (and not a zombie)?
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
            .unwrap_or(false)
}

/// Sends a signal by name (`TERM`, `KILL`).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .output();
}
