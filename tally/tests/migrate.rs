//! `tally migrate` as the deployment's migration Job runs it: the schema applied once on a fresh
//! database, the roles' logins given the secret's passwords, and a server that asks for them
//! letting each role in with its own and no other.

mod common;

use common::{command, succeeded, tally};
use harness::PgCluster;

const FRESH: &str = "tally_fresh";
const PASSWORDS: [(&str, &str, &str); 3] = [
    (
        "TALLY_INGEST_DB_PASSWORD",
        db::INGEST_ROLE,
        "ingest-0123456789abcdef",
    ),
    (
        "TALLY_AGGREGATOR_DB_PASSWORD",
        db::AGGREGATOR_ROLE,
        "aggregator-0123456789abcdef",
    ),
    (
        "TALLY_READER_DB_PASSWORD",
        db::READER_ROLE,
        "reader-0123456789abcdef",
    ),
];

fn migrate(url: &str, passwords: bool) -> serde_json::Value {
    let args = ["migrate", "--postgres-url", url, "--json"];
    let mut c = command(&args);
    if passwords {
        for (env, _, password) in PASSWORDS {
            c.env(env, password);
        }
    }
    serde_json::from_str(&succeeded(&args, c.output().unwrap())).unwrap()
}

async fn login(pg: &PgCluster, role: &str, password: &str) -> Result<db::Client, String> {
    let url = format!(
        "host=127.0.0.1 port={} user={role} password={password} dbname={FRESH}",
        pg.primary.port
    );
    db::connect(&url).await.map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn migrate_applies_the_schema_once_and_gives_each_role_its_password() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    db::ensure_database(&pg.primary.admin_url(), FRESH).await?;
    let url = pg.primary.url(servers::SUPERUSER, FRESH);

    // Bad settings change nothing: exit 64, one line, no table made.
    let short = command(&["migrate", "--postgres-url", &url])
        .env("TALLY_READER_DB_PASSWORD", "short")
        .output()?;
    let err = String::from_utf8_lossy(&short.stderr);
    assert_eq!(short.status.code(), Some(64), "{err}");
    assert!(err.contains("shorter than 16"), "{err}");
    let bad_url = tally(&["migrate", "--postgres-url", "host=x port=notaport"]);
    assert_eq!(bad_url.status.code(), Some(64));
    let owner = db::connect(&url).await?;
    let tables: i64 = owner
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(tables, 0, "a refused run made tables");

    let first = migrate(&url, true);
    let all: Vec<i32> = db::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(first["applied"], serde_json::json!(all), "{first}");
    assert_eq!(
        first["passwords_set"],
        serde_json::json!([db::INGEST_ROLE, db::AGGREGATOR_ROLE, db::READER_ROLE])
    );
    let again = migrate(&url, false);
    assert_eq!(again["applied"], serde_json::json!([]), "{again}");
    assert_eq!(again["passwords_set"], serde_json::json!([]));

    // From here the server asks the roles for their passwords, as RDS does.
    let hba = pg.primary.data_dir.join("pg_hba.conf");
    let trusting = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!(
            "host all tally_ingest,tally_aggregator,tally_reader 127.0.0.1/32 scram-sha-256\n{trusting}"
        ),
    )?;
    owner.batch_execute("SELECT pg_reload_conf()").await?;

    for (_, role, password) in PASSWORDS {
        let client = login(&pg, role, password)
            .await
            .unwrap_or_else(|e| panic!("{role} with its password: {e}"));
        client.query_one("SELECT count(*) FROM polls", &[]).await?;
        let refused = login(&pg, role, "not-the-password-at-all")
            .await
            .err()
            .unwrap_or_else(|| panic!("{role} logged in with a wrong password"));
        assert!(
            refused.contains("password authentication failed"),
            "{refused}"
        );
    }
    // Only the owner changes the schema.
    let ingest = login(&pg, db::INGEST_ROLE, PASSWORDS[0].2).await.unwrap();
    let denied = ingest
        .batch_execute("CREATE TABLE mine (x int)")
        .await
        .unwrap_err();
    assert!(
        format!("{denied:?}").contains("permission denied"),
        "{denied:?}"
    );
    Ok(())
}
