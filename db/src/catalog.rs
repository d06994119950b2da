//! Polls in PostgreSQL.

use model::{OptionId, Poll, PollId};
use tokio_postgres::Client;

use crate::DbError;

pub async fn load_polls(client: &Client) -> Result<Vec<Poll>, DbError> {
    let rows = client
        .query("SELECT id, options, open FROM polls ORDER BY id", &[])
        .await?;
    rows.iter()
        .map(|r| {
            let id: String = r.get(0);
            let options: Vec<String> = r.get(1);
            let bad = |e: model::IdError| DbError::BadPoll {
                id: id.clone(),
                reason: e.to_string(),
            };
            Ok(Poll {
                id: PollId::new(id.clone()).map_err(bad)?,
                options: options
                    .into_iter()
                    .map(OptionId::new)
                    .collect::<Result<_, _>>()
                    .map_err(bad)?,
                open: r.get(2),
            })
        })
        .collect()
}

/// Creates the poll with a zero tally per option, in one transaction.
pub async fn create_poll(client: &mut Client, poll: &Poll) -> Result<(), DbError> {
    let options: Vec<&str> = poll.options.iter().map(OptionId::as_str).collect();
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO polls (id, options, open) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            &[&poll.id.as_str(), &options, &poll.open],
        )
        .await?;
    if inserted == 0 {
        return Err(DbError::PollExists(poll.id.to_string()));
    }
    tx.execute(
        "INSERT INTO tally_parts (poll_id, option, part) SELECT $1, unnest($2::text[]), 0",
        &[&poll.id.as_str(), &options],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn set_poll_open(client: &Client, poll: &str, open: bool) -> Result<(), DbError> {
    let n = client
        .execute("UPDATE polls SET open = $2 WHERE id = $1", &[&poll, &open])
        .await?;
    if n == 0 {
        return Err(DbError::NoSuchPoll(poll.to_string()));
    }
    Ok(())
}
