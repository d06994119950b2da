-- Polls, per-voter ballots (latest vote wins) and per-option tallies.

CREATE TABLE IF NOT EXISTS polls (
    id         text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    options    text[] NOT NULL CHECK (cardinality(options) BETWEEN 2 AND 64),
    open       boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per voter per poll. No foreign key to polls: the aggregator checks polls against its
-- catalog before writing, and a per-row key check would cost the hot path for nothing.
CREATE TABLE IF NOT EXISTS ballots (
    poll_id         text   NOT NULL,
    voter_id        text   NOT NULL,
    option          text   NOT NULL,
    vote_id         uuid   NOT NULL,
    -- Microseconds since the epoch from ingest's clock; (cast_at, vote_id) orders a voter's votes.
    cast_at         bigint NOT NULL,
    region          text   NOT NULL,
    -- The option this row held before its last change (NULL after the first vote). Written by the
    -- upsert from the locked row itself, so tally deltas stay exact when writers race on one voter.
    replaced_option text,
    PRIMARY KEY (poll_id, voter_id)
) WITH (fillfactor = 90);

-- Per-option counts, split into parts so concurrent writers never wait on each other's rows: each
-- aggregator writer adds its deltas to its own part. No CHECK (count >= 0): a part may go negative
-- when a voter's change is applied by another writer than their first vote; only the sum means anything.
CREATE TABLE IF NOT EXISTS tally_parts (
    poll_id text     NOT NULL REFERENCES polls (id),
    option  text     NOT NULL,
    part    smallint NOT NULL,
    count   bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (poll_id, option, part)
);

-- What operators and readers query: one row per poll and option.
CREATE OR REPLACE VIEW tallies AS
    SELECT poll_id, option, sum(count)::bigint AS count FROM tally_parts GROUP BY poll_id, option;

INSERT INTO polls (id, options) VALUES ('default', ARRAY['a', 'b']) ON CONFLICT (id) DO NOTHING;
INSERT INTO tally_parts (poll_id, option, part) VALUES ('default', 'a', 0), ('default', 'b', 0) ON CONFLICT DO NOTHING;
