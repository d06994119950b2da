//! PostgreSQL for Tally: the schema as versioned migrations, the poll catalog, and connecting.
#![forbid(unsafe_code)]

pub mod audit;
mod cache;
mod catalog;
pub mod certify;
pub mod freshness;
mod migrate;

pub use cache::CatalogCache;

pub use catalog::{
    close_poll, create_poll, load_polls, poll_row, reopen_poll, rescheduled, reveal_poll,
    schedule_poll, PollRow,
};
pub use freshness::{
    current_lsn, freshness, has_replayed, parse_lsn, replica_lags, Freshness, ReplicaLag,
};
pub use migrate::{migrate, set_password, LOGIN_ROLES, MIGRATIONS};

pub use tokio_postgres::Client;

/// Role names the migrations create.
pub const READER_ROLE: &str = "tally_reader";
pub const INGEST_ROLE: &str = "tally_ingest";
pub const AGGREGATOR_ROLE: &str = "tally_aggregator";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("poll {0:?} already exists")]
    PollExists(String),
    #[error("no such poll {0:?}")]
    NoSuchPoll(String),
    #[error("poll {id:?} in the database is invalid: {reason}")]
    BadPoll { id: String, reason: String },
    #[error("{0}")]
    BadWindow(String),
    #[error("poll {poll:?}: its ballots count {ballots} but its tallies say {tallies}; nothing was certified")]
    Unbalanced {
        poll: String,
        ballots: String,
        tallies: String,
    },
    #[error("writing the export: {0}")]
    Export(String),
    #[error("{0} is not one of Tally's login roles")]
    UnknownRole(String),
}

/// Connects and drives the connection on the current runtime. `url` may list several hosts
/// (`host=a,b port=1,2 target_session_attrs=read-write`) to find whichever is the primary.
pub async fn connect(url: &str) -> Result<Client, DbError> {
    let (client, connection) = tokio_postgres::connect(url, tls::postgres()).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// The database Tally keeps its tables in.
pub const DATABASE: &str = "tally";

/// Creates `name` through the server at `admin_url` unless it exists.
pub async fn ensure_database(admin_url: &str, name: &str) -> Result<(), DbError> {
    let client = connect(admin_url).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Identifiers cannot be bound as parameters; `name` is one of our constants or a test's.
        match client
            .batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "")))
            .await
        {
            Ok(()) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
