-- Event ids are unique per run, not across all runs: an agent-chosen id
-- that repeats another run's is its own event.
ALTER TABLE sandbox_events DROP CONSTRAINT sandbox_events_pkey;
ALTER TABLE sandbox_events ADD PRIMARY KEY (run_id, event_id);
