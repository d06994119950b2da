//! What the binary-level tests share: running `tally`, a stack directory that is stopped on the
//! way out, a raw HTTP GET.
#![allow(dead_code)]

use std::process::{Command, Output};

pub fn tally(args: &[&str]) -> Output {
    command(args).output().expect("running tally")
}

/// `tally args`, quiet logs, for a test to add its own environment.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.args(args).env("RUST_LOG", "warn");
    c
}

/// Its stdout; fails the test with both streams when it did not succeed.
pub fn succeeded(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "tally {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ok(args: &[&str]) -> String {
    succeeded(args, tally(args))
}

/// Held by a test while it runs a local stack: two stacks planned at once in one test binary
/// can draw the same free port, and the second to bind it fails.
pub fn one_stack_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A test's own stack directory: `tally local down` runs on it when the test ends, also when it
/// fails half-way, before the directory is removed.
pub struct StackDir(tempfile::TempDir);

impl StackDir {
    pub fn new(prefix: &str) -> Self {
        Self(tempfile::Builder::new().prefix(prefix).tempdir().unwrap())
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    pub fn dir(&self) -> &str {
        self.0.path().to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for StackDir {
    fn drop(&mut self) {
        let _ = tally(&["local", "down", "--dir", self.dir()]);
    }
}

/// `GET path` on `addr` (`host:port`) with any extra header lines; the whole response.
pub fn http_get(addr: &str, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}
