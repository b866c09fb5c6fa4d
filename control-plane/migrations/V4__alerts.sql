-- The notifier's alerts (labels, timing, what each receiver was told) and the
-- operators' silences, as JSON readable with SQL.
CREATE TABLE alerts (key text PRIMARY KEY, record jsonb NOT NULL);
CREATE TABLE silences (id text PRIMARY KEY, record jsonb NOT NULL);
