-- Each message's kind (status, window, alert, event, ack) and a window report's model,
-- for retention per kind and the downsampling of old window reports. Rows stored
-- before this version have neither: retention treats them as the kind kept longest.
ALTER TABLE messages ADD COLUMN kind text, ADD COLUMN model text;
CREATE INDEX messages_windows ON messages (device, model, seq) WHERE kind = 'window';
