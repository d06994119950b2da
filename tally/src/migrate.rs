//! `tally migrate`: the step before the roles start, run by the operator or the deployment's
//! migration Job. It applies the schema's migrations on the primary as the schema's owner, and
//! gives each role's login the password the deployment's secret holds for it. The roles never
//! run as the owner and never change the schema.

use anyhow::Context;

use crate::stack;
use crate::usage::bad;

pub const ENV_POSTGRES_PASSWORD: &str = "TALLY_POSTGRES_PASSWORD";
pub const ENV_INGEST_DB_PASSWORD: &str = "TALLY_INGEST_DB_PASSWORD";
pub const ENV_AGGREGATOR_DB_PASSWORD: &str = "TALLY_AGGREGATOR_DB_PASSWORD";
pub const ENV_READER_DB_PASSWORD: &str = "TALLY_READER_DB_PASSWORD";

/// Shorter role passwords are refused: they are machine-made and never typed.
const MIN_PASSWORD: usize = 16;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    dir: stack::Dir,
    /// The primary, as the schema's owner; a multi-host URL with `target_session_attrs=read-write`
    /// finds it (default: the local stack's primary).
    #[arg(long, env = ingest::config::ENV_POSTGRES_URL)]
    postgres_url: Option<String>,
    /// The owner's password, when the URL does not carry it (RDS's managed master secret).
    #[arg(long, env = ENV_POSTGRES_PASSWORD, hide_env_values = true)]
    postgres_password: Option<String>,
    /// Password for ingest's login (`tally_ingest`); unchanged when not given.
    #[arg(long, env = ENV_INGEST_DB_PASSWORD, hide_env_values = true)]
    ingest_password: Option<String>,
    /// Password for the aggregator's login (`tally_aggregator`).
    #[arg(long, env = ENV_AGGREGATOR_DB_PASSWORD, hide_env_values = true)]
    aggregator_password: Option<String>,
    /// Password for the reader's login (`tally_reader`).
    #[arg(long, env = ENV_READER_DB_PASSWORD, hide_env_values = true)]
    reader_password: Option<String>,
    /// Print what was done as one JSON object.
    #[arg(long)]
    json: bool,
}

impl MigrateArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let url = match &self.postgres_url {
            Some(u) => u.clone(),
            None => stack::primary_url(&self.dir)?,
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| bad(format!("--postgres-url: {e}")))?;
        if let Some(p) = &self.postgres_password {
            config.password(p);
        }
        let passwords: Vec<(&str, &String)> = [
            (db::INGEST_ROLE, &self.ingest_password),
            (db::AGGREGATOR_ROLE, &self.aggregator_password),
            (db::READER_ROLE, &self.reader_password),
        ]
        .into_iter()
        .filter_map(|(role, p)| p.as_ref().map(|p| (role, p)))
        .collect();
        if let Some((role, _)) = passwords.iter().find(|(_, p)| p.len() < MIN_PASSWORD) {
            return Err(bad(format!(
                "the password for {role} is shorter than {MIN_PASSWORD} characters"
            )));
        }
        crate::runtime()?.block_on(async {
            let (mut client, connection) = config
                .connect(tls::postgres())
                .await
                .context("connecting to the primary")?;
            tokio::spawn(connection);
            let applied = db::migrate(&mut client).await.context("migrating")?;
            for (role, password) in &passwords {
                db::set_password(&client, role, password)
                    .await
                    .with_context(|| format!("setting {role}'s password"))?;
            }
            let version = db::MIGRATIONS.last().map_or(0, |m| m.0);
            let set: Vec<&str> = passwords.iter().map(|(role, _)| *role).collect();
            if self.json {
                println!(
                    "{}",
                    serde_json::json!({"applied": applied, "schema_version": version, "passwords_set": set})
                );
            } else {
                match applied.as_slice() {
                    [] => println!("schema up to date (version {version})"),
                    a => println!("applied migrations {a:?}: schema at version {version}"),
                }
                if !set.is_empty() {
                    println!("passwords set for {}", set.join(", "));
                }
            }
            anyhow::Ok(())
        })
    }
}
