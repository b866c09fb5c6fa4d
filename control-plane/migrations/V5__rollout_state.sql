-- A rollout's record is as long as its target list: about 5 MB for 10,000 devices.
-- Kept as json (the text as written) instead of jsonb, it is read back without being
-- turned into text again: 32 ms instead of 236 ms for three such records, measured on
-- PostgreSQL 15. Its state gets a column of its own, kept by PostgreSQL from the
-- record, so that the rollout engine finds the unfinished rollouts without reading the
-- finished ones.
ALTER TABLE rollouts ALTER COLUMN record TYPE json USING record::json;
ALTER TABLE rollouts ADD COLUMN state text GENERATED ALWAYS AS (record ->> 'state') STORED;
CREATE INDEX rollouts_by_state ON rollouts (state);
