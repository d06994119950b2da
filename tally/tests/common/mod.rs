//! What the binary-level tests share: running `tally`, a stack directory that is stopped on the
//! way out, a raw HTTP GET.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A role process, killed when the test ends; its stderr goes to a file the test can read.
pub struct Role {
    child: Child,
    log: PathBuf,
}

impl Role {
    /// `tally args` with `env` added to the test's own environment (less any CA file: a test
    /// names the one it wants).
    pub fn start(args: &[&str], env: &[(&str, &str)], log: PathBuf) -> Self {
        let mut c = command(args);
        c.env_remove(tls::ENV_CA_FILE);
        c.envs(env.iter().copied());
        let child = c
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it holds; after `limit` fails the test with `why()`, which says what was
/// seen instead.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool, why: impl Fn() -> String) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{} (waited {limit:?})", why());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGINT to a `tally` run started with its stderr piped and waits for it: it must fail,
/// saying it was interrupted. Returns its stderr.
pub fn interrupt(run: Child) -> String {
    servers::signal(run.id(), "INT");
    let out = run.wait_with_output().expect("waiting for tally");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    stderr
}

pub fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Ingest's flags for anonymous voters behind a trusted gateway: the test is the gateway, and
/// its `X-Voter-Id` says who votes.
pub const ANONYMOUS_VOTERS: [&str; 5] = [
    "--anonymous-voters",
    "--cookie-secret",
    "a-cookie-secret-for-tests-only-32b",
    "--trusted-proxies",
    "127.0.0.1/32",
];

/// A vote from a gateway that says who the voter is (see [`ANONYMOUS_VOTERS`]).
pub fn vote(addr: &str, voter: &str, option: &str) -> String {
    post_vote(addr, "default", &format!("X-Voter-Id: {voter}"), option)
}

/// A vote for `poll` with one extra header line (`Authorization: Bearer ...`, say); the raw
/// answer.
pub fn post_vote(addr: &str, poll: &str, header: &str, option: &str) -> String {
    use std::io::{Read, Write};
    let body = format!(r#"{{"option":"{option}"}}"#);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/polls/{poll}/votes HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{header}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The pids of every region's `role` in a local stack's directory, from their pid files.
pub fn role_pids(stack: &std::path::Path, role: &str) -> Vec<u32> {
    let suffix = format!("-{role}.pid");
    std::fs::read_dir(stack.join("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
        .filter_map(|e| servers::read_pid(&e.path()))
        .collect()
}

pub fn listen() -> String {
    format!("127.0.0.1:{}", servers::free_port())
}

/// Waits until `count_sql` (a `SELECT count(*)`) on `client` gives `want`; `why` says what a
/// timeout would mean.
pub async fn wait_for_count(
    client: &db::Client,
    count_sql: &str,
    want: i64,
    why: impl Fn(i64) -> String,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let n: i64 = client.query_one(count_sql, &[]).await?.get(0);
        if n == want {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "{}", why(n));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
