-- The aggregator acknowledges a batch to Redis only once a replica has replayed its commit. It
-- asks the replicas where they replayed to and on which timeline they receive, which only roles
-- with pg_read_all_stats may see (a read-only statistics role, as ingest and readers have).
GRANT pg_read_all_stats TO tally_aggregator;
