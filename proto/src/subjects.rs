//! Every subject, stream, consumer and bucket name corral uses.

use std::fmt;

/// Names derived from one subject prefix (default `corral`).
///
/// The prefix is the first subject token and, upper-cased, the start of every
/// stream name: prefix `corral` gives `corral.cmd.run` and stream `CORRAL_CMD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    stream_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixError(String);

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid subject prefix {:?}: use 1 to 32 characters of a-z, 0-9, '_' or '-', starting with a letter",
            self.0
        )
    }
}

impl std::error::Error for PrefixError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdError(String);

impl fmt::Display for RunIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid run id {:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'",
            self.0
        )
    }
}

impl std::error::Error for RunIdError {}

/// A run id is one subject token: 1..=64 of `[A-Za-z0-9_-]`.
pub fn validate_run_id(run_id: &str) -> Result<(), RunIdError> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 64
        && run_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RunIdError(run_id.to_owned()))
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(Subjects::DEFAULT_PREFIX).expect("the default prefix should be valid")
    }
}

impl Subjects {
    pub const DEFAULT_PREFIX: &'static str = "corral";

    /// Durable consumer on the command stream shared by all spawners.
    pub const SPAWNER_CONSUMER: &'static str = "spawner";
    /// Durable consumer on the command stream through which the tracker
    /// records stop commands that clients published directly.
    pub const TRACKER_STOP_CONSUMER: &'static str = "tracker-stop";
    /// Queue group of the tracker's request-reply subjects.
    pub const TRACKER_QUEUE_GROUP: &'static str = "tracker";

    pub fn new(prefix: &str) -> Result<Subjects, PrefixError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix.as_bytes()[0].is_ascii_lowercase()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Err(PrefixError(prefix.to_owned()));
        }
        Ok(Subjects {
            prefix: prefix.to_owned(),
            stream_prefix: prefix.to_ascii_uppercase().replace('-', "_"),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- commands: stream CMD (work queue) ----

    /// `<p>.cmd.run`: `RunCommand`.
    pub fn cmd_run(&self) -> String {
        format!("{}.cmd.run", self.prefix)
    }

    /// `<p>.cmd.continue`: `ContinueCommand`.
    pub fn cmd_continue(&self) -> String {
        format!("{}.cmd.continue", self.prefix)
    }

    /// `<p>.cmd.session`: `SessionCommand` (pause, resume, end a kept run).
    pub fn cmd_session(&self) -> String {
        format!("{}.cmd.session", self.prefix)
    }

    /// `<p>.cmd.stop.<run_id>`: `StopCommand`.
    pub fn cmd_stop(&self, run_id: &str) -> String {
        format!("{}.cmd.stop.{run_id}", self.prefix)
    }

    /// `<p>.cmd.stop.>`: every stop (the tracker's stop consumer).
    pub fn cmd_stop_all(&self) -> String {
        format!("{}.cmd.stop.>", self.prefix)
    }

    /// `<p>.cmd.*`: run, continue and session (the spawners' shared consumer); does
    /// not overlap the stop subjects, as a work-queue stream requires.
    pub fn cmd_work(&self) -> String {
        format!("{}.cmd.*", self.prefix)
    }

    /// `<p>.cmd.>`: the command stream's subjects.
    pub fn cmd_all(&self) -> String {
        format!("{}.cmd.>", self.prefix)
    }

    // ---- lifecycle: stream LIFECYCLE ----

    /// `<p>.lifecycle.<run_id>`: `LifecycleEvent`.
    pub fn lifecycle(&self, run_id: &str) -> String {
        format!("{}.lifecycle.{run_id}", self.prefix)
    }

    pub fn lifecycle_all(&self) -> String {
        format!("{}.lifecycle.>", self.prefix)
    }

    // ---- agent events: stream EVENTS ----

    /// `<p>.events.<run_id>.<kind>` where kind is e.g. `agent.output`.
    pub fn events(&self, run_id: &str, kind: &str) -> String {
        format!("{}.events.{run_id}.{kind}", self.prefix)
    }

    /// `<p>.events.<run_id>.>`: every event of one run.
    pub fn events_of_run(&self, run_id: &str) -> String {
        format!("{}.events.{run_id}.>", self.prefix)
    }

    /// The run an events subject names (`<p>.events.<run_id>.<kind>`).
    pub fn run_of_event<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".events.")?
            .split('.')
            .next()
    }

    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    // ---- tracker request-reply ----

    /// `<p>.tracker.<op>`.
    pub fn tracker(&self, op: &str) -> String {
        format!("{}.tracker.{op}", self.prefix)
    }

    pub fn tracker_all(&self) -> String {
        format!("{}.tracker.*", self.prefix)
    }

    /// The op named by a tracker subject, if it is one.
    pub fn tracker_op<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".tracker.")
    }

    // ---- node-local work (request-reply) ----

    /// `<p>.node.<node>.<op>`: work only a process on that node can do
    /// (the local provider's sandboxes), e.g. op `kill`.
    pub fn node(&self, node: &str, op: &str) -> String {
        format!("{}.node.{node}.{op}", self.prefix)
    }

    // ---- dead letters: stream DLQ ----

    /// `<p>.dlq.<what>`: a message that could not be decoded or applied,
    /// with the error in the `Corral-Error` header.
    pub fn dlq(&self, what: &str) -> String {
        format!("{}.dlq.{what}", self.prefix)
    }

    pub fn dlq_all(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    // ---- streams ----

    pub fn cmd_stream(&self) -> String {
        format!("{}_CMD", self.stream_prefix)
    }

    pub fn lifecycle_stream(&self) -> String {
        format!("{}_LIFECYCLE", self.stream_prefix)
    }

    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }

    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.stream_prefix)
    }

    // ---- key-value buckets ----

    /// JetStream KV bucket holding the reaper's leader lease (key `leader`).
    pub fn reaper_lease_bucket(&self) -> String {
        format!("{}_REAPER", self.stream_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_gives_the_documented_names() {
        let s = Subjects::default();
        assert_eq!(s.cmd_run(), "corral.cmd.run");
        assert_eq!(s.cmd_stop("r1"), "corral.cmd.stop.r1");
        assert_eq!(s.cmd_continue(), "corral.cmd.continue");
        assert_eq!(s.cmd_session(), "corral.cmd.session");
        assert_eq!(s.lifecycle("r1"), "corral.lifecycle.r1");
        assert_eq!(
            s.events("r1", "agent.output"),
            "corral.events.r1.agent.output"
        );
        assert_eq!(s.tracker("claim"), "corral.tracker.claim");
        assert_eq!(s.dlq("cmd"), "corral.dlq.cmd");
        assert_eq!(s.cmd_stream(), "CORRAL_CMD");
        assert_eq!(s.events_stream(), "CORRAL_EVENTS");
    }

    #[test]
    fn prefix_with_dash_gives_valid_stream_names() {
        let s = Subjects::new("t-ab12").expect("valid");
        assert_eq!(s.cmd_stream(), "T_AB12_CMD");
        assert_eq!(s.tracker_op("t-ab12.tracker.get"), Some("get"));
        assert_eq!(s.tracker_op("other.tracker.get"), None);
    }

    #[test]
    fn bad_prefixes_and_run_ids_are_refused() {
        for bad in ["", "Corral", "a.b", "a*", "1abc", &"x".repeat(33)] {
            assert!(Subjects::new(bad).is_err(), "{bad:?} should be refused");
        }
        for bad in ["", "a.b", "a b", "a>", &"x".repeat(65)] {
            assert!(validate_run_id(bad).is_err(), "{bad:?} should be refused");
        }
        validate_run_id("01J-abc_DEF").expect("valid run id");
    }
}
