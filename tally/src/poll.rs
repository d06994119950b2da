//! `tally poll create|close|open|list`, written to the primary.

use anyhow::Context;
use model::Poll;

pub async fn create(url: &str, id: &str, options: &[String]) -> anyhow::Result<()> {
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let poll = Poll::new(id, &options).map_err(|e| crate::roles::BadConfig(e.to_string()))?;
    let mut client = db::connect(url)
        .await
        .context("connecting to the primary")?;
    db::create_poll(&mut client, &poll).await?;
    println!("created poll {id} with options {}", options.join(", "));
    Ok(())
}

pub async fn set_open(url: &str, id: &str, open: bool) -> anyhow::Result<()> {
    let client = db::connect(url)
        .await
        .context("connecting to the primary")?;
    db::set_poll_open(&client, id, open).await?;
    println!("poll {id} is {}", if open { "open" } else { "closed" });
    Ok(())
}

pub async fn list(url: &str) -> anyhow::Result<()> {
    let client = db::connect(url).await.context("connecting")?;
    for p in db::load_polls(&client).await? {
        let options: Vec<&str> = p.options.iter().map(|o| o.as_str()).collect();
        println!(
            "{}\t{}\t{}",
            p.id,
            if p.open { "open" } else { "closed" },
            options.join(",")
        );
    }
    Ok(())
}
