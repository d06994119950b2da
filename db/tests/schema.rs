//! Migrations, the poll catalog and the least-privilege roles, against a real PostgreSQL.

use std::time::Duration;

use harness::PgCluster;
use model::Poll;

/// Everything a migration could change: tables and columns, roles, grants, data.
async fn schema_fingerprint(client: &db::Client) -> anyhow::Result<String> {
    let q = "
      SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
        SELECT format('col %s.%s %s %s', table_name, column_name, data_type, column_default) AS x
          FROM information_schema.columns WHERE table_schema = 'public'
        UNION ALL SELECT format('role %s %s', rolname, rolcanlogin) FROM pg_roles WHERE rolname LIKE 'tally_%'
        UNION ALL SELECT format('grant %s %s %s', grantee, table_name, privilege_type)
          FROM information_schema.role_table_grants WHERE grantee LIKE 'tally_%'
        UNION ALL SELECT format('poll %s %s %s %s %s', id, options, opens_at, closes_at, hidden) FROM polls
        UNION ALL SELECT format('tally %s %s %s', poll_id, option, count) FROM tallies
        UNION ALL SELECT format('migration %s %s', version, name) FROM schema_migrations
      ) t";
    Ok(client
        .query_one(q, &[])
        .await?
        .get::<_, Option<String>>(0)
        .unwrap_or_default())
}

#[tokio::test]
async fn migrations_are_idempotent() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?; // applies them once
    let mut client = pg.client().await?;
    let before = schema_fingerprint(&client).await?;
    assert!(before.contains("poll default {a,b}   f"), "{before}");
    assert!(before.contains("migration 3 windows"), "{before}");
    let applied = db::migrate(&mut client).await?;
    assert!(applied.is_empty(), "second run applied {applied:?}");
    assert_eq!(schema_fingerprint(&client).await?, before);
    Ok(())
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    pg.client()
        .await?
        .batch_execute(
            "DROP VIEW tallies; DROP TABLE schema_migrations, ballots, tally_parts, polls,
                    late_votes, queue_shards, poll_drained",
        )
        .await?;
    let runs = (0..4).map(|_| {
        let url = pg.url();
        tokio::spawn(async move {
            let mut c = db::connect(&url).await?;
            anyhow::Ok(db::migrate(&mut c).await?)
        })
    });
    let mut total = Vec::new();
    for r in runs {
        total.extend(r.await??);
    }
    total.sort();
    assert_eq!(total, vec![1, 2, 3, 4]);
    Ok(())
}

#[tokio::test]
async fn polls_created_on_the_primary_reach_the_replica() -> anyhow::Result<()> {
    let pg = PgCluster::start_with_replica().await?;
    let mut client = pg.client().await?;
    db::create_poll(&mut client, &Poll::new("final", &["x", "y", "z"])?).await?;
    let again = db::create_poll(&mut client, &Poll::new("final", &["x", "y"])?).await;
    assert!(
        matches!(again, Err(db::DbError::PollExists(ref id)) if id == "final"),
        "{again:?}"
    );
    pg.wait_replica_caught_up(Duration::from_secs(5)).await?;
    let replica = db::connect(&pg.replica_url()).await?;
    let polls = db::load_polls(&replica).await?;
    let fin = polls
        .iter()
        .find(|p| p.id.as_str() == "final")
        .expect("final on the replica");
    assert_eq!(
        fin.options.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
        ["x", "y", "z"]
    );
    let zeros: i64 = replica
        .query_one(
            "SELECT count(*) FROM tallies WHERE poll_id = 'final' AND count = 0",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(zeros, 3);
    Ok(())
}

#[tokio::test]
async fn each_role_is_refused_the_writes_it_must_not_make() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let reader = db::connect(&pg.primary.url(db::READER_ROLE, db::DATABASE)).await?;
    assert_eq!(reader.query("SELECT * FROM tallies", &[]).await?.len(), 2);
    for sql in [
        "INSERT INTO tally_parts (poll_id, option, part, count) VALUES ('default', 'c', 1, 1)",
        "UPDATE tally_parts SET count = 99",
        "UPDATE ballots SET option = 'b'",
        "DELETE FROM ballots",
        "INSERT INTO polls (id, options) VALUES ('x', ARRAY['a','b'])",
    ] {
        let err = reader.execute(sql, &[]).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    let ingest = db::connect(&pg.primary.url(db::INGEST_ROLE, db::DATABASE)).await?;
    assert!(
        ingest.query("SELECT * FROM tallies", &[]).await.is_err(),
        "ingest may read polls only"
    );
    assert_eq!(ingest.query("SELECT id FROM polls", &[]).await?.len(), 1);
    refused(
        &ingest,
        &[
            "INSERT INTO polls (id, options) VALUES ('x', ARRAY['a','b'])",
            "UPDATE polls SET open = false",
            "INSERT INTO ballots VALUES ('default', 'v', 'a', gen_random_uuid(), 1, 'us-east-1', NULL)",
            "UPDATE tally_parts SET count = 99",
            "CREATE TABLE public.sneaky (x int)",
        ],
    )
    .await;
    // The aggregator writes ballots and tally parts, and nothing else.
    let aggregator = db::connect(&pg.primary.url(db::AGGREGATOR_ROLE, db::DATABASE)).await?;
    refused(
        &aggregator,
        &[
            "INSERT INTO polls (id, options) VALUES ('x', ARRAY['a','b'])",
            "UPDATE polls SET open = false",
            "DELETE FROM ballots",
            "DELETE FROM tally_parts",
            "TRUNCATE ballots",
            "CREATE TABLE public.sneaky (x int)",
        ],
    )
    .await;
    Ok(())
}

/// Each statement fails for want of privilege, not for any other reason.
async fn refused(client: &db::Client, statements: &[&str]) {
    for sql in statements {
        let err = client.execute(*sql, &[]).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
}

#[tokio::test]
async fn closing_a_poll_sets_its_close_by_the_primarys_clock_once() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let mut client = pg.client().await?;
    let before = db::poll_row(&client, "default").await?.now;
    let closed = db::close_poll(&client, "default").await?;
    assert!(closed >= before, "closed at the primary's now");
    let poll = &db::load_polls(&client).await?[0];
    assert_eq!(poll.window.closes_at, Some(closed));
    assert_eq!(
        db::close_poll(&client, "default").await?,
        closed,
        "closing again keeps the first close"
    );
    assert!(
        db::schedule_poll(
            &mut client,
            "default",
            None,
            Some(model::Stamp(closed.0 + 60_000_000))
        )
        .await
        .is_err(),
        "an ended window does not move"
    );
    db::reopen_poll(&client, "default").await?;
    assert_eq!(db::load_polls(&client).await?[0].window.closes_at, None);
    assert!(matches!(
        db::close_poll(&client, "nope").await,
        Err(db::DbError::NoSuchPoll(_))
    ));
    Ok(())
}

#[tokio::test]
async fn a_database_of_before_windows_moves_forward() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    // A database as the first two migrations left it, with a poll closed by the old flag.
    let admin = pg.primary.admin_url();
    db::ensure_database(&admin, "before_windows").await?;
    let url = pg.primary.url(servers::SUPERUSER, "before_windows");
    let mut client = db::connect(&url).await?;
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                             applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    for &(version, name, sql) in &db::MIGRATIONS[..2] {
        client.batch_execute(sql).await?;
        client
            .execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await?;
    }
    client
        .batch_execute(
            "INSERT INTO polls (id, options, open) VALUES ('old-closed', ARRAY['x','y'], false)",
        )
        .await?;
    assert_eq!(db::migrate(&mut client).await?, vec![3, 4]);
    let polls = db::load_polls(&client).await?;
    let by_id = |id: &str| polls.iter().find(|p| p.id.as_str() == id).unwrap().clone();
    assert_eq!(
        by_id("default").window,
        model::Window::default(),
        "an open poll stays open"
    );
    assert!(
        by_id("old-closed").window.closes_at.is_some(),
        "a closed poll is closed"
    );
    assert!(!by_id("default").hidden);
    Ok(())
}
