-- The live runs page by run id (the reaper's sweep): an index that holds
-- only them, in that order, so a page costs what it returns.
CREATE INDEX runs_live_run_id_idx ON runs (run_id)
    WHERE state NOT IN ('completed', 'failed', 'stopped', 'timed_out');
