-- Least privilege: one login role per kind of client. Roles are cluster-wide, so create them only
-- where missing; grants are idempotent.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_reader') THEN
        CREATE ROLE tally_reader LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_ingest') THEN
        CREATE ROLE tally_ingest LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_aggregator') THEN
        CREATE ROLE tally_aggregator LOGIN;
    END IF;
END
$$;

-- Readers read; ingest reads the poll catalog only.
GRANT SELECT ON polls, tallies, tally_parts, ballots TO tally_reader;
GRANT SELECT ON polls TO tally_ingest;
-- The aggregator writes ballots and tally parts and reads polls; it never changes polls.
GRANT SELECT ON polls, tallies TO tally_aggregator;
GRANT SELECT, INSERT, UPDATE ON ballots, tally_parts TO tally_aggregator;
-- Readers report replica freshness; whether the WAL receiver is streaming is visible only to
-- roles with pg_read_all_stats, a read-only statistics role.
GRANT pg_read_all_stats TO tally_reader;
