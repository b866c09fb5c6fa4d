-- The values the ingest rewrites at every message are compressed with lz4 instead of
-- PostgreSQL's default pglz: a device's state (4.5 KB of CBOR for `fleetctl sim`'s
-- devices, 1.9 KB stored either way) and each window report's envelope (3 KB), and the
-- rollout records (5 MB for 10,000 devices). On PostgreSQL 15 here, writing 50,000
-- such states took 0.86 s with lz4 and 2.58 s with pglz; rewriting them, 1.0 s and
-- 3.4 s. Values already stored keep pglz until they are written again; both read back
-- the same. A server built without lz4 (or older than PostgreSQL 14, which cannot
-- choose) keeps pglz: the migration notes it and goes on.
DO $$
BEGIN
  EXECUTE 'ALTER TABLE device_state ALTER COLUMN state SET COMPRESSION lz4';
  EXECUTE 'ALTER TABLE messages ALTER COLUMN envelope SET COMPRESSION lz4';
  EXECUTE 'ALTER TABLE rollouts ALTER COLUMN record SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
  RAISE NOTICE 'lz4 compression is not available here (%); pglz stays', SQLERRM;
END $$;
