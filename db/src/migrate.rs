//! Versioned SQL migrations, applied by the operator's `tally migrate` (the local stack's `up`).

use tokio_postgres::Client;

use crate::DbError;

/// (version, name, SQL), in order. Append only: an applied migration is never edited.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "core", include_str!("../migrations/0001_core.sql")),
    (2, "roles", include_str!("../migrations/0002_roles.sql")),
    (3, "windows", include_str!("../migrations/0003_windows.sql")),
    (4, "replay", include_str!("../migrations/0004_replay.sql")),
];

/// Any stable number: serializes concurrent migrators across every process and region.
const MIGRATION_LOCK: i64 = 0x7a11_7a11;

/// Applies the migrations that are missing, in one transaction; returns the versions applied now.
/// Safe to run concurrently and repeatedly: the second run applies nothing and changes nothing.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, DbError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut now_applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        now_applied.push(version);
    }
    tx.commit().await?;
    if !now_applied.is_empty() {
        tracing::info!(versions = ?now_applied, "applied migrations");
    }
    Ok(now_applied)
}

/// The roles a deployment gives a password: each client's own login.
pub const LOGIN_ROLES: &[&str] = &[
    crate::INGEST_ROLE,
    crate::AGGREGATOR_ROLE,
    crate::READER_ROLE,
];

/// Sets `role`'s password (one of [`LOGIN_ROLES`]) as a SCRAM-SHA-256 verifier computed here, so
/// the password itself never reaches the server or its logs.
pub async fn set_password(client: &Client, role: &str, password: &str) -> Result<(), DbError> {
    if !LOGIN_ROLES.contains(&role) {
        return Err(DbError::UnknownRole(role.to_string()));
    }
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    // A role cannot be a bound parameter; `role` is one of ours and the verifier is base64 and `$`.
    client
        .batch_execute(&format!(
            "ALTER ROLE {role} WITH LOGIN PASSWORD '{}'",
            verifier.replace('\'', "")
        ))
        .await?;
    Ok(())
}
