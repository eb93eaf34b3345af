-- A spawner that got SIGTERM drains: it says so in its heartbeats, with
-- the time it will end what is left (`corral ls` shows it).
ALTER TABLE spawners
    ADD COLUMN draining_since TIMESTAMPTZ,
    ADD COLUMN drain_deadline TIMESTAMPTZ;
