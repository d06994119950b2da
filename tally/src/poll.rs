//! `tally poll create|close|open|list`, written to the primary.

use anyhow::Context;
use clap::Subcommand;
use model::Poll;

use crate::stack;
use crate::usage::bad;

#[derive(Debug, clap::Args)]
pub struct PollTarget {
    #[command(flatten)]
    dir: stack::Dir,
    /// The primary's URL (default: the local stack's primary).
    #[arg(long, env = ingest::config::ENV_POSTGRES_URL)]
    postgres_url: Option<String>,
}

impl PollTarget {
    fn url(&self) -> anyhow::Result<String> {
        match &self.postgres_url {
            Some(u) => Ok(u.clone()),
            None => stack::primary_url(&self.dir),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PollCmd {
    /// Create a poll with the given options.
    Create {
        id: String,
        /// Comma-separated options, at least two.
        #[arg(long, value_delimiter = ',', required = true)]
        options: Vec<String>,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Stop accepting votes for a poll (409 from then on).
    Close {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Accept votes for a poll again.
    Open {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// List polls.
    List {
        #[command(flatten)]
        target: PollTarget,
    },
}

impl PollCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match self {
            PollCmd::Create {
                id,
                options,
                target,
            } => rt.block_on(create(&target.url()?, &id, &options)),
            PollCmd::Close { id, target } => rt.block_on(set_open(&target.url()?, &id, false)),
            PollCmd::Open { id, target } => rt.block_on(set_open(&target.url()?, &id, true)),
            PollCmd::List { target } => rt.block_on(list(&target.url()?)),
        }
    }
}

async fn create(url: &str, id: &str, options: &[String]) -> anyhow::Result<()> {
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let poll = Poll::new(id, &options).map_err(bad)?;
    let mut client = db::connect(url)
        .await
        .context("connecting to the primary")?;
    db::create_poll(&mut client, &poll).await?;
    println!("created poll {id} with options {}", options.join(", "));
    Ok(())
}

async fn set_open(url: &str, id: &str, open: bool) -> anyhow::Result<()> {
    let client = db::connect(url)
        .await
        .context("connecting to the primary")?;
    db::set_poll_open(&client, id, open).await?;
    println!("poll {id} is {}", if open { "open" } else { "closed" });
    Ok(())
}

async fn list(url: &str) -> anyhow::Result<()> {
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
