//! The live results page in a real browser (Debian's Chromium, driven by playwright-core): it shows
//! the counts and follows a change without a reload. `scripts/test` installs both.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::PgCluster;
use model::RegionName;
use reader::{Config, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_page_shows_counts_and_updates_live() -> anyhow::Result<()> {
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../browser");
    anyhow::ensure!(
        std::path::Path::new(browser_dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run scripts/test (or `npm ci --prefix browser`)"
    );
    let pg = PgCluster::start_with_replica().await?;
    pg.client()
        .await?
        .batch_execute(
            "UPDATE tally_parts SET count = 3 WHERE poll_id = 'default' AND option = 'a'",
        )
        .await?;
    let sources = vec![Source {
        name: "eu-west-1".into(),
        url: pg.replica().url(db::READER_ROLE, db::DATABASE),
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/?poll=default", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(reader::run(
        listener,
        Config::new(RegionName::new("eu-west-1")?, sources),
        async move {
            let _ = stopped.await;
        },
    ));

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("results-page.png");
    let mut node = Command::new("node")
        .arg(format!("{browser_dir}/page.mjs"))
        .args([url.as_str(), shot.to_str().unwrap(), "a", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let shown = tokio::task::spawn_blocking(move || {
        let first = lines.next().transpose();
        (first, lines)
    });
    let (first, lines) = tokio::time::timeout(Duration::from_secs(30), shown).await??;
    let first = first?.unwrap_or_default();
    assert!(
        first.starts_with("SHOWN 3 (100.0%)"),
        "the page showed {first:?}"
    );

    pg.client()
        .await?
        .batch_execute(
            "UPDATE tally_parts SET count = 8 WHERE poll_id = 'default' AND option = 'a'",
        )
        .await?;
    let rest: Vec<String> =
        tokio::task::spawn_blocking(move || lines.map_while(Result::ok).collect()).await?;
    let status = node.wait()?;
    assert!(status.success(), "browser script failed: {rest:?}");
    let updated = rest
        .iter()
        .find(|l| l.starts_with("UPDATED"))
        .cloned()
        .unwrap_or_default();
    assert!(
        updated.starts_with("UPDATED 8 (100.0%)") && updated.contains("total=8"),
        "{updated}"
    );
    assert!(updated.contains("bars=100%,0%"), "{updated}");
    assert!(
        std::fs::metadata(&shot)?.len() > 1_000,
        "no screenshot at {}",
        shot.display()
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
