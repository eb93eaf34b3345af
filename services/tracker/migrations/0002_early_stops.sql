-- Stops published for runs the tracker has not heard of yet (a client may
-- publish a RunCommand without submitting it, and stop it before any
-- spawner claims it). The run is created with the stop already requested.
CREATE TABLE early_stops (
    run_id       TEXT PRIMARY KEY,
    reason       TEXT NOT NULL DEFAULT '',
    requested_by TEXT NOT NULL DEFAULT '',
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
