-- When the control plane stored each message (milliseconds since the epoch, the
-- database's clock), for retention by age: devices' own timestamps cannot be trusted
-- for it. Rows stored before this version count as stored when it was applied.
ALTER TABLE messages
    ADD COLUMN stored_ms bigint NOT NULL
    DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
CREATE INDEX messages_by_stored_ms ON messages (stored_ms);
