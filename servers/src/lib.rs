//! Starts and stops real PostgreSQL and Redis servers from the binaries installed on this
//! machine, on ports and in directories of the caller's choosing.
//!
//! Used by `tally local` for the long-lived local stack and by the test harness for throwaway
//! servers. Never touches a server it did not start: everything is addressed by data directory
//! and port, never by service name.
#![forbid(unsafe_code)]

mod daemon;
mod moto;
mod postgres;
mod process;
mod prometheus;
mod redis;
mod tls;

pub use postgres::{PgBin, Postgres, StopMode, SUPERUSER};

pub use moto::Moto;
pub use process::{
    free_port, http_call, http_status, on_free_port, pid_alive, port_is_free, process_state,
    read_pid, running_as_root, signal, working_under,
};
pub use prometheus::Prometheus;
pub use redis::{redis_info, replicas_in_sync, AclUser, Fsync, Redis, Sentinel};
pub use tls::TestCa;

use std::path::PathBuf;

/// Why a server could not be set up, started or stopped. Each message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what} not found: {hint}")]
    MissingBinary { what: String, hint: &'static str },
    #[error("port {0} on 127.0.0.1 is already in use")]
    PortInUse(u16),
    #[error("{program} failed: {detail}")]
    CommandFailed { program: String, detail: String },
    #[error("{server} did not become ready within {seconds}s: {detail}")]
    NotReady {
        server: String,
        seconds: u64,
        detail: String,
    },
    #[error("{server} exited during start-up: {detail}")]
    Crashed { server: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ServerError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ServerError {
        let path = path.into();
        move |source| ServerError::Io { path, source }
    }
}

/// Installing the servers, for error messages.
pub const INSTALL_HINT: &str =
    "install PostgreSQL 15, Redis 7 and openssl (Debian/Ubuntu: `sudo apt-get install postgresql redis-server redis-tools openssl`; \
     elsewhere put initdb, pg_ctl, pg_basebackup and redis-server on PATH or set TALLY_PG_BIN)";
