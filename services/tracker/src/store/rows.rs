//! The `runs` row as the store reads it, and its mapping to the proto
//! [`Run`]. Every query that returns whole runs selects [`COLUMNS`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use corral_proto::v1::{Run, RunSpec, RunState};
use prost::Message;
use sqlx::FromRow;

pub(super) const COLUMNS: &str = "run_id, state, version, spec, labels, provider, requested_by, owner, \
    sandbox_id, sandbox_epoch, exit_code, reason, timeout_secs, idle_timeout_secs, deadline_at, \
    last_activity_at, stop_requested_at, stop_reason, stop_requested_by, created_at, booting_at, \
    running_at, finalizing_at, finished_at, updated_at, session_id, turn, idle_at, paused_at, \
    idle_pause_secs, resource_class";

#[derive(FromRow, Clone, Debug)]
pub(super) struct RunRow {
    pub(super) run_id: String,
    pub(super) state: String,
    pub(super) version: i64,
    pub(super) spec: Vec<u8>,
    pub(super) labels: sqlx::types::Json<BTreeMap<String, String>>,
    pub(super) provider: String,
    pub(super) requested_by: String,
    pub(super) owner: Option<String>,
    pub(super) sandbox_id: Option<String>,
    pub(super) sandbox_epoch: i32,
    pub(super) exit_code: Option<i32>,
    pub(super) reason: String,
    pub(super) timeout_secs: i32,
    pub(super) idle_timeout_secs: i32,
    pub(super) deadline_at: Option<DateTime<Utc>>,
    pub(super) last_activity_at: Option<DateTime<Utc>>,
    pub(super) stop_requested_at: Option<DateTime<Utc>>,
    pub(super) stop_reason: Option<String>,
    pub(super) stop_requested_by: Option<String>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) booting_at: Option<DateTime<Utc>>,
    pub(super) running_at: Option<DateTime<Utc>>,
    pub(super) finalizing_at: Option<DateTime<Utc>>,
    pub(super) finished_at: Option<DateTime<Utc>>,
    pub(super) updated_at: DateTime<Utc>,
    pub(super) session_id: Option<String>,
    pub(super) turn: i32,
    pub(super) idle_at: Option<DateTime<Utc>>,
    pub(super) paused_at: Option<DateTime<Utc>>,
    pub(super) idle_pause_secs: i32,
    pub(super) resource_class: String,
}

/// A row as an UPDATE left it, with the state it had before.
#[derive(FromRow)]
pub(super) struct AppliedRow {
    pub(super) prev_state: String,
    #[sqlx(flatten)]
    pub(super) row: RunRow,
}

/// [`COLUMNS`] qualified by a table alias.
pub(super) fn prefixed_columns(alias: &str) -> String {
    COLUMNS
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn ms(at: Option<DateTime<Utc>>) -> i64 {
    at.map(|t| t.timestamp_millis()).unwrap_or(0)
}

impl RunRow {
    pub(super) fn state(&self) -> RunState {
        RunState::from_name(&self.state).unwrap_or(RunState::Unspecified)
    }

    pub(super) fn to_proto(&self) -> Run {
        let mut spec = RunSpec::decode(self.spec.as_slice()).unwrap_or_default();
        spec.labels = self.labels.0.clone().into_iter().collect();
        Run {
            run_id: self.run_id.clone(),
            state: self.state() as i32,
            spec: Some(spec),
            owner: self.owner.clone().unwrap_or_default(),
            sandbox_id: self.sandbox_id.clone().unwrap_or_default(),
            provider: self.provider.clone(),
            version: self.version as u64,
            exit_code: self.exit_code,
            reason: self.reason.clone(),
            sandbox_epoch: self.sandbox_epoch as u32,
            created_at_ms: self.created_at.timestamp_millis(),
            booting_at_ms: ms(self.booting_at),
            running_at_ms: ms(self.running_at),
            finalizing_at_ms: ms(self.finalizing_at),
            finished_at_ms: ms(self.finished_at),
            deadline_at_ms: ms(self.deadline_at),
            last_activity_at_ms: ms(self.last_activity_at),
            stop_requested_at_ms: ms(self.stop_requested_at),
            stop_reason: self.stop_reason.clone().unwrap_or_default(),
            stop_requested_by: self.stop_requested_by.clone().unwrap_or_default(),
            updated_at_ms: self.updated_at.timestamp_millis(),
            requested_by: self.requested_by.clone(),
            timeout_secs: self.timeout_secs,
            idle_timeout_secs: self.idle_timeout_secs,
            session_id: self.session_id.clone().unwrap_or_default(),
            turn: self.turn as u32,
            idle_at_ms: ms(self.idle_at),
            paused_at_ms: ms(self.paused_at),
            idle_pause_secs: self.idle_pause_secs,
            resource_class: self.resource_class.clone(),
            // Filled in by `get` and `list` (from the run's history).
            cost_usd: 0.0,
            billed_running_ms: 0,
            billed_paused_ms: 0,
        }
    }
}
