-- Kept sessions (turns, idle pause) and cost.
ALTER TABLE runs
    -- The agent's session id, handed to the next turn; cleared when the
    -- sandbox is replaced.
    ADD COLUMN session_id      TEXT,
    ADD COLUMN turn            INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN idle_at         TIMESTAMPTZ,
    ADD COLUMN paused_at       TIMESTAMPTZ,
    -- Seconds idle before the reaper pauses the sandbox.
    ADD COLUMN idle_pause_secs INTEGER NOT NULL DEFAULT 600,
    -- The price table row the run is billed at.
    ADD COLUMN resource_class  TEXT NOT NULL DEFAULT 'default';

-- Cost by period reads transitions by time.
CREATE INDEX run_transitions_at_idx ON run_transitions (at);
