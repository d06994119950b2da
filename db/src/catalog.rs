//! Polls in PostgreSQL: their options, their window, whether results are hidden, and the
//! commands that change them. Instants are read and written as microseconds since the epoch,
//! the unit of votes' stamps.

use model::{OptionId, Poll, PollId, Stamp, Window};
use tokio_postgres::Client;

use crate::DbError;

/// A `timestamptz` column as microseconds since the epoch.
pub(crate) fn micros(column: &str) -> String {
    format!("(EXTRACT(EPOCH FROM {column}) * 1000000)::int8")
}

pub async fn load_polls(client: &Client) -> Result<Vec<Poll>, DbError> {
    let sql = format!(
        "SELECT id, options, {}, {}, hidden FROM polls ORDER BY id",
        micros("opens_at"),
        micros("closes_at")
    );
    let rows = client.query(&sql, &[]).await?;
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
                window: Window {
                    opens_at: stamp(r.get(2)),
                    closes_at: stamp(r.get(3)),
                },
                hidden: r.get(4),
            })
        })
        .collect()
}

pub(crate) fn stamp(micros: Option<i64>) -> Option<Stamp> {
    micros.map(|m| Stamp(m.max(0) as u64))
}

fn param(s: Option<Stamp>) -> Option<i64> {
    s.map(|s| s.0 as i64)
}

/// Creates the poll with a zero tally per option, in one transaction.
pub async fn create_poll(client: &mut Client, poll: &Poll) -> Result<(), DbError> {
    let options: Vec<&str> = poll.options.iter().map(OptionId::as_str).collect();
    if let (Some(o), Some(c)) = (poll.window.opens_at, poll.window.closes_at) {
        if o >= c {
            return Err(DbError::BadWindow(
                "the poll must open before it closes".into(),
            ));
        }
    }
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO polls (id, options, opens_at, closes_at, hidden)
             VALUES ($1, $2, timestamptz 'epoch' + $3::int8 * interval '1 microsecond', timestamptz 'epoch' + $4::int8 * interval '1 microsecond', $5)
             ON CONFLICT (id) DO NOTHING",
            &[
                &poll.id.as_str(),
                &options,
                &param(poll.window.opens_at),
                &param(poll.window.closes_at),
                &poll.hidden,
            ],
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

/// Where a poll stands, as the primary sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRow {
    pub window: Window,
    pub hidden: bool,
    pub revealed: bool,
    pub final_at: Option<Stamp>,
    /// The primary's clock when this was read.
    pub now: Stamp,
}

pub async fn poll_row(client: &Client, poll: &str) -> Result<PollRow, DbError> {
    let sql = format!(
        "SELECT {}, {}, hidden, revealed_at IS NOT NULL, {}, {} FROM polls WHERE id = $1",
        micros("opens_at"),
        micros("closes_at"),
        micros("final_at"),
        micros("clock_timestamp()")
    );
    let row = client
        .query_opt(&sql, &[&poll])
        .await?
        .ok_or_else(|| DbError::NoSuchPoll(poll.to_string()))?;
    Ok(PollRow {
        window: Window {
            opens_at: stamp(row.get(0)),
            closes_at: stamp(row.get(1)),
        },
        hidden: row.get(2),
        revealed: row.get(3),
        final_at: stamp(row.get(4)),
        now: stamp(row.get(5)).unwrap_or(Stamp(0)),
    })
}

/// Closes the poll now, by the primary's clock; a poll already closed keeps its close, and one
/// that has not opened yet ends before it begins (its opening moves to just before the close).
/// Returns the close.
pub async fn close_poll(client: &Client, poll: &str) -> Result<Stamp, DbError> {
    let sql = format!(
        "WITH now AS (SELECT clock_timestamp() AS t)
         UPDATE polls SET closes_at = now.t,
                          opens_at = LEAST(opens_at, now.t - interval '1 microsecond')
           FROM now
          WHERE id = $1 AND final_at IS NULL AND (closes_at IS NULL OR closes_at > now.t)
          RETURNING {}",
        micros("closes_at")
    );
    if let Some(row) = client.query_opt(&sql, &[&poll]).await? {
        return Ok(stamp(row.get(0)).expect("just set"));
    }
    let row = poll_row(client, poll).await?;
    row.window
        .closes_at
        .ok_or_else(|| DbError::BadWindow("the poll cannot be closed".into()))
}

/// Moves the window of a poll that has not ended: a close must stay in the future (closing now
/// is `close_poll`), and a poll that has opened cannot be made to open later.
pub async fn schedule_poll(
    client: &mut Client,
    poll: &str,
    opens_at: Option<Stamp>,
    closes_at: Option<Stamp>,
) -> Result<Window, DbError> {
    let tx = client.transaction().await?;
    let sql = format!(
        "SELECT {}, {}, final_at IS NOT NULL, {} FROM polls WHERE id = $1 FOR UPDATE",
        micros("opens_at"),
        micros("closes_at"),
        micros("clock_timestamp()")
    );
    let row = tx
        .query_opt(&sql, &[&poll])
        .await?
        .ok_or_else(|| DbError::NoSuchPoll(poll.to_string()))?;
    let now = stamp(row.get(3)).unwrap_or(Stamp(0));
    let current = Window {
        opens_at: stamp(row.get(0)),
        closes_at: stamp(row.get(1)),
    };
    let is_final: bool = row.get(2);
    let next = rescheduled(current, opens_at, closes_at, now, is_final)?;
    tx.execute(
        "UPDATE polls SET opens_at = timestamptz 'epoch' + $2::int8 * interval '1 microsecond',
                closes_at = timestamptz 'epoch' + $3::int8 * interval '1 microsecond'
          WHERE id = $1",
        &[&poll, &param(next.opens_at), &param(next.closes_at)],
    )
    .await?;
    tx.commit().await?;
    Ok(next)
}

/// The window after a reschedule, or why it is refused.
pub fn rescheduled(
    current: Window,
    opens_at: Option<Stamp>,
    closes_at: Option<Stamp>,
    now: Stamp,
    is_final: bool,
) -> Result<Window, DbError> {
    let bad = |why: &str| Err(DbError::BadWindow(why.into()));
    if is_final || current.closes_at.is_some_and(|c| c <= now) {
        return bad("the poll's window has ended; it cannot be moved");
    }
    let next = Window {
        opens_at: opens_at.or(current.opens_at),
        closes_at: closes_at.or(current.closes_at),
    };
    if closes_at.is_some_and(|c| c <= now) {
        return bad("the close must be in the future (`tally poll close` closes now)");
    }
    let has_opened = current.opens_at.is_none_or(|o| o <= now);
    if has_opened && opens_at.is_some_and(|o| o > now) {
        return bad("the poll is open already; it cannot be made to open later");
    }
    if let (Some(o), Some(c)) = (next.opens_at, next.closes_at) {
        if o >= c {
            return bad("the poll must open before it closes");
        }
    }
    Ok(next)
}

/// Accepts votes again: a poll closed and not yet final loses its close.
pub async fn reopen_poll(client: &Client, poll: &str) -> Result<(), DbError> {
    let n = client
        .execute(
            "UPDATE polls SET closes_at = NULL WHERE id = $1 AND final_at IS NULL",
            &[&poll],
        )
        .await?;
    if n == 0 {
        poll_row(client, poll).await?;
        return Err(DbError::BadWindow(
            "the poll is final; its result cannot change".into(),
        ));
    }
    Ok(())
}

/// Serves a hidden poll's results to the public from now on.
pub async fn reveal_poll(client: &Client, poll: &str) -> Result<(), DbError> {
    let n = client
        .execute(
            "UPDATE polls SET revealed_at = COALESCE(revealed_at, clock_timestamp()) WHERE id = $1",
            &[&poll],
        )
        .await?;
    if n == 0 {
        return Err(DbError::NoSuchPoll(poll.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(o: Option<u64>, c: Option<u64>) -> Window {
        Window {
            opens_at: o.map(Stamp),
            closes_at: c.map(Stamp),
        }
    }

    #[test]
    fn only_a_window_that_has_not_ended_moves_and_never_into_the_past() {
        let now = Stamp(1000);
        let open = w(Some(500), Some(2000));
        assert_eq!(
            rescheduled(open, None, Some(Stamp(3000)), now, false).unwrap(),
            w(Some(500), Some(3000))
        );
        assert!(
            rescheduled(open, None, Some(Stamp(900)), now, false).is_err(),
            "close in the past"
        );
        assert!(
            rescheduled(open, Some(Stamp(1500)), None, now, false).is_err(),
            "un-open an open poll"
        );
        assert!(
            rescheduled(w(Some(500), Some(900)), None, Some(Stamp(5000)), now, false).is_err(),
            "ended"
        );
        assert!(
            rescheduled(open, None, Some(Stamp(3000)), now, true).is_err(),
            "final"
        );
        let scheduled = w(Some(1500), Some(2000));
        assert_eq!(
            rescheduled(scheduled, Some(Stamp(1200)), None, now, false).unwrap(),
            w(Some(1200), Some(2000))
        );
        assert!(
            rescheduled(scheduled, Some(Stamp(2500)), None, now, false).is_err(),
            "opens after closing"
        );
    }
}
