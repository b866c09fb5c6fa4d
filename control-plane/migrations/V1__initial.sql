-- The control plane's state (see control-plane/src/store/postgres.rs). Keys are
-- text COLLATE "C" so that listings come back in byte order, as the embedded store
-- returns them. CBOR columns hold what the devices and the ingest exchange (device
-- records, signed envelopes, device states, assignment records); jsonb columns hold
-- the operator-facing records, readable with SQL.

CREATE TABLE devices (
    id text COLLATE "C" PRIMARY KEY,
    record bytea NOT NULL
);

CREATE TABLE messages (
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    envelope bytea NOT NULL,
    PRIMARY KEY (device, seq)
);

CREATE TABLE device_high (
    device text COLLATE "C" PRIMARY KEY,
    high bigint NOT NULL
);

CREATE TABLE device_state (
    device text COLLATE "C" PRIMARY KEY,
    state bytea NOT NULL
);

CREATE TABLE command_seq (
    device text COLLATE "C" PRIMARY KEY,
    next bigint NOT NULL
);

CREATE TABLE assignments (
    device text COLLATE "C" PRIMARY KEY,
    record bytea NOT NULL
);

CREATE SEQUENCE rollout_ids;
CREATE TABLE rollouts (
    id text COLLATE "C" PRIMARY KEY,
    created_ms bigint NOT NULL,
    record jsonb NOT NULL
);

CREATE TABLE tokens (
    hash text COLLATE "C" PRIMARY KEY,
    id text COLLATE "C" NOT NULL,
    created_ms bigint NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX tokens_by_id ON tokens (id);

CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    entry jsonb NOT NULL
);

CREATE TABLE policies (
    model text COLLATE "C" PRIMARY KEY,
    policy jsonb NOT NULL,
    state jsonb NOT NULL
);

CREATE TABLE models (
    name text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE captures (
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (device, seq)
);

CREATE TABLE datasets (
    id text COLLATE "C" PRIMARY KEY,
    created_ms bigint NOT NULL,
    record jsonb NOT NULL
);

CREATE SEQUENCE job_ids;
CREATE TABLE jobs (
    id text COLLATE "C" PRIMARY KEY,
    created_ms bigint NOT NULL,
    record jsonb NOT NULL
);

CREATE TABLE job_specs (
    model text COLLATE "C" PRIMARY KEY,
    spec text NOT NULL
);
