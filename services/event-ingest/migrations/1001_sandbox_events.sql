-- Agent events, stored exactly once (event_id is the key); owned by
-- event-ingest. Numbered apart from the tracker's migrations: both share the
-- database and the migrations table, each ignoring the other's.
CREATE TABLE sandbox_events (
    event_id    TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    -- The CORRAL_EVENTS stream sequence: a global order and the read cursor.
    stream_seq  BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    payload     JSONB NOT NULL,
    truncated   BOOLEAN NOT NULL DEFAULT false,
    ingested_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX sandbox_events_run_idx ON sandbox_events (run_id, stream_seq);
