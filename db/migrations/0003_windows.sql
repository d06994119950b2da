-- The night of the show: voting windows, a certified final result, hidden results, and the votes
-- that came too late, kept with their reason.

-- A window: votes stamped at or after `opens_at` and before `closes_at` count (NULL: no bound).
-- `final_at` is when every vote acknowledged before the close was counted; from then on the
-- poll's ballots and tallies never change, `final_counts` holds the certified counts and
-- `digest` the SHA-256 of its ballots' canonical listing (see `tally poll audit --export`).
ALTER TABLE polls
    ADD COLUMN IF NOT EXISTS opens_at     timestamptz,
    ADD COLUMN IF NOT EXISTS closes_at    timestamptz,
    ADD COLUMN IF NOT EXISTS hidden       boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS revealed_at  timestamptz,
    ADD COLUMN IF NOT EXISTS final_at     timestamptz,
    ADD COLUMN IF NOT EXISTS final_counts jsonb,
    ADD COLUMN IF NOT EXISTS digest       text;

-- Polls closed with the `open` flag before windows existed are closed as of now; open ones
-- stay open, without a window.
UPDATE polls SET closes_at = now() WHERE NOT open AND closes_at IS NULL;

ALTER TABLE polls DROP CONSTRAINT IF EXISTS polls_window_order;
ALTER TABLE polls ADD CONSTRAINT polls_window_order
    CHECK (opens_at IS NULL OR closes_at IS NULL OR opens_at < closes_at);

-- Votes the aggregator did not count because of when they were stamped: before the opening,
-- at or after the close, or (stamped before it but stored too late to be acknowledged) after the
-- poll was certified final. One row a vote: a redelivered batch adds nothing.
CREATE TABLE IF NOT EXISTS late_votes (
    vote_id     uuid        PRIMARY KEY,
    poll_id     text        NOT NULL,
    voter_id    text        NOT NULL,
    option      text        NOT NULL,
    cast_at     bigint      NOT NULL,
    region      text        NOT NULL,
    reason      text        NOT NULL CHECK (reason IN ('before_open', 'after_close', 'after_final')),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS late_votes_poll ON late_votes (poll_id, region, reason);

-- Every Redis shard whose votes a poll's result must include: each aggregator names the shards
-- it drains when it starts.
CREATE TABLE IF NOT EXISTS queue_shards (
    region text     NOT NULL,
    shard  smallint NOT NULL,
    PRIMARY KEY (region, shard)
);

-- A shard that has counted every vote it held when the poll's close (and its grace) had passed.
-- Keyed by the close too: a poll reopened and closed again is certified afresh.
CREATE TABLE IF NOT EXISTS poll_drained (
    poll_id    text        NOT NULL,
    closes_at  timestamptz NOT NULL,
    region     text        NOT NULL,
    shard      smallint    NOT NULL,
    drained_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (poll_id, closes_at, region, shard)
);

-- Ingest and readers read the windows; the aggregator keeps late votes, names its shards, marks
-- them drained and certifies polls final (it writes only the final columns: see the grants).
GRANT SELECT ON late_votes, queue_shards, poll_drained TO tally_reader;
GRANT SELECT, INSERT ON late_votes, queue_shards, poll_drained TO tally_aggregator;
GRANT UPDATE (final_at, final_counts, digest) ON polls TO tally_aggregator;
-- Ingest judges its catalog's age by its replica's own word on how far behind it is, which
-- needs the WAL receiver's state (a read-only statistics role, as readers have).
GRANT pg_read_all_stats TO tally_ingest;
