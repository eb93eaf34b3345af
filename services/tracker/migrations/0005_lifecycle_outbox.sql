-- The lifecycle outbox. Every row of run_transitions is written in the
-- transition's own statement; a relay publishes the rows not yet relayed,
-- in id order, with Nats-Msg-Id `<run_id>:<version>`, and marks them. So
-- a consumer of the lifecycle stream sees exactly the rows of this table,
-- whatever dies between a commit and its publish.
--
-- The row carries what the announcement says (the run's version, exit
-- code and sandbox after the transition). Rows written before this
-- migration were announced the old way: they count as relayed.
ALTER TABLE run_transitions
    ADD COLUMN version    BIGINT,
    ADD COLUMN exit_code  INTEGER,
    ADD COLUMN sandbox_id TEXT,
    ADD COLUMN relayed    BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE run_transitions ALTER COLUMN relayed SET DEFAULT false;
CREATE INDEX run_transitions_unrelayed_idx ON run_transitions (id) WHERE NOT relayed;
