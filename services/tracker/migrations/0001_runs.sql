-- Runs and their history; owned by the tracker, the single authority over run state.

CREATE TABLE runs (
    run_id            TEXT PRIMARY KEY,
    state             TEXT NOT NULL CHECK (state IN ('pending', 'booting', 'running', 'idle', 'paused',
                                                     'finalizing', 'completed', 'failed', 'stopped', 'timed_out')),
    -- Compare-and-set: every change to the row bumps it.
    version           BIGINT NOT NULL DEFAULT 1,
    -- The RunSpec protobuf as submitted.
    spec              BYTEA NOT NULL,
    labels            JSONB NOT NULL DEFAULT '{}'::jsonb,
    provider          TEXT NOT NULL,
    requested_by      TEXT NOT NULL DEFAULT '',
    owner             TEXT,
    sandbox_id        TEXT,
    -- Bumped every time the run gets a new sandbox, so actions judged
    -- against one sandbox never hit its replacement.
    sandbox_epoch     INTEGER NOT NULL DEFAULT 0,
    exit_code         INTEGER,
    reason            TEXT NOT NULL DEFAULT '',
    timeout_secs      INTEGER NOT NULL,
    idle_timeout_secs INTEGER NOT NULL,
    deadline_at       TIMESTAMPTZ,
    last_activity_at  TIMESTAMPTZ,
    stop_requested_at TIMESTAMPTZ,
    stop_reason       TEXT,
    stop_requested_by TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    booting_at        TIMESTAMPTZ,
    running_at        TIMESTAMPTZ,
    finalizing_at     TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Sweeps and listings of live runs cost what is live, not the table's size.
CREATE INDEX runs_live_idx ON runs (state, run_id)
    WHERE state NOT IN ('completed', 'failed', 'stopped', 'timed_out');
CREATE INDEX runs_live_owner_idx ON runs (owner)
    WHERE state NOT IN ('completed', 'failed', 'stopped', 'timed_out');
CREATE INDEX runs_created_idx ON runs (created_at DESC, run_id DESC);
CREATE INDEX runs_labels_idx ON runs USING gin (labels jsonb_path_ops);

-- Every applied transition, for audit and cost accounting.
CREATE TABLE run_transitions (
    id         BIGSERIAL PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES runs (run_id),
    from_state TEXT,
    to_state   TEXT NOT NULL,
    event      TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    actor      TEXT NOT NULL DEFAULT '',
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX run_transitions_run_idx ON run_transitions (run_id, id);

-- Spawner liveness: heartbeats prove an owner is alive.
CREATE TABLE spawners (
    spawner_id   TEXT PRIMARY KEY,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    owned_runs   INTEGER NOT NULL DEFAULT 0,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
