//! What the reaper acts on: the due runs (each with the first reason that
//! applies) and the pages of live runs it reconciles, plus the liveness they
//! are judged by — runs' activity and spawners' heartbeats.

use chrono::{DateTime, Utc};
use corral_proto::v1::{DueRun, HeartbeatRequest, Run, RunState, SweepRequest, due_run};
use sqlx::FromRow;

use super::fence::HOLD_SECS;
use super::rows::{COLUMNS, RunRow, ms};
use super::{Store, StoreError};

/// run_id, state, owner, sandbox_id, sandbox_epoch, version, provider,
/// stop_requested_at, stop_reason.
type LiveRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    i32,
    i64,
    String,
    Option<DateTime<Utc>>,
    Option<String>,
);

#[derive(FromRow)]
struct DueRow {
    due: String,
    #[sqlx(flatten)]
    row: RunRow,
}

impl Store {
    /// Resets the inactivity window of live runs (no version bump: activity
    /// is not a change of state).
    pub async fn activity(&self, run_ids: &[String]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE runs SET last_activity_at = now()
             WHERE run_id = ANY($1) AND state NOT IN ('completed', 'failed', 'stopped', 'timed_out')",
        )
        .bind(run_ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One page of live runs by run id, with only what reconciliation needs
    /// (run id, state, owner, sandbox id and epoch, version, provider): those
    /// after `after`, at most `limit`, and the cursor of the next page (""
    /// when this is the last).
    pub async fn live(&self, after: &str, limit: u32) -> Result<(Vec<Run>, String), StoreError> {
        let limit = if limit == 0 { 5000 } else { limit.min(20_000) };
        let mut rows: Vec<LiveRow> = sqlx::query_as(
            "SELECT run_id, state, owner, sandbox_id, sandbox_epoch, version, provider,
                    stop_requested_at, stop_reason FROM runs
             WHERE state NOT IN ('completed', 'failed', 'stopped', 'timed_out') AND run_id > $1
             ORDER BY run_id
             LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|row| row.0.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let runs = rows
            .into_iter()
            .map(
                |(
                    run_id,
                    state,
                    owner,
                    sandbox_id,
                    epoch,
                    version,
                    provider,
                    stop_requested_at,
                    stop_reason,
                )| Run {
                    run_id,
                    state: RunState::from_name(&state).unwrap_or(RunState::Unspecified) as i32,
                    owner: owner.unwrap_or_default(),
                    sandbox_id: sandbox_id.unwrap_or_default(),
                    sandbox_epoch: epoch as u32,
                    version: version as u64,
                    provider,
                    // A live run asked to stop whose sandbox is gone was
                    // stopped, not lost: the reaper reads these to tell.
                    stop_requested_at_ms: ms(stop_requested_at),
                    stop_reason: stop_reason.unwrap_or_default(),
                    ..Default::default()
                },
            )
            .collect();
        Ok((runs, next))
    }

    /// Live runs the reaper must act on, each with the first reason that
    /// applies. Scans the live-runs partial index only.
    pub async fn sweep(&self, request: &SweepRequest) -> Result<Vec<DueRun>, StoreError> {
        let limit = if request.limit == 0 {
            1000
        } else {
            request.limit
        };
        let rows = sqlx::query_as::<_, DueRow>(&format!(
            "SELECT due, {COLUMNS} FROM (
                SELECT CASE
                    WHEN stop_requested_at < now() - make_interval(secs => $1 / 1000.0)
                         AND state <> 'finalizing' THEN 'stop_ignored'
                    WHEN deadline_at < now() - make_interval(secs => $4 / 1000.0) THEN 'deadline'
                    WHEN state = 'running'
                         AND last_activity_at < now() - make_interval(secs => idle_timeout_secs + $4 / 1000.0)
                         THEN 'inactivity'
                    WHEN state IN ('booting', 'running', 'finalizing') AND owner IS NOT NULL
                         AND NOT EXISTS (SELECT 1 FROM spawners s WHERE s.spawner_id = runs.owner
                                         AND s.heartbeat_at > now() - make_interval(secs => $2 / 1000.0))
                         AND updated_at < now() - make_interval(secs => $2 / 1000.0)
                         THEN 'owner_lost'
                    WHEN state = 'booting' AND booting_at < now() - make_interval(secs => $3 / 1000.0)
                         THEN 'stuck_boot'
                    WHEN state = 'pending' AND $7 > 0
                         AND created_at < now() - make_interval(secs => $7 / 1000.0)
                         THEN 'stuck_pending'
                    WHEN state = 'idle' AND idle_pause_secs > 0
                         AND idle_at < now() - make_interval(secs => idle_pause_secs)
                         AND (owner IS NULL OR updated_at < now() - make_interval(secs => $6))
                         THEN 'idle_pause'
                END AS due, *
                FROM runs
                WHERE state NOT IN ('completed', 'failed', 'stopped', 'timed_out')
            ) live
            WHERE due IS NOT NULL
            ORDER BY run_id
            LIMIT $5"
        ))
        .bind(request.stop_grace_ms as f64)
        .bind(request.owner_timeout_ms as f64)
        .bind(request.boot_limit_ms as f64)
        .bind(request.backstop_grace_ms as f64)
        .bind(limit as i64)
        .bind(HOLD_SECS)
        .bind(request.pending_limit_ms as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|due| {
                let why = match due.due.as_str() {
                    "stop_ignored" => due_run::Why::StopIgnored,
                    "deadline" => due_run::Why::Deadline,
                    "inactivity" => due_run::Why::Inactivity,
                    "owner_lost" => due_run::Why::OwnerLost,
                    "idle_pause" => due_run::Why::IdlePause,
                    "stuck_pending" => due_run::Why::StuckPending,
                    _ => due_run::Why::StuckBoot,
                };
                DueRun {
                    why: why as i32,
                    run: Some(due.row.to_proto()),
                }
            })
            .collect())
    }

    /// Records a spawner's heartbeat: it is alive, owns this many runs, and
    /// whether (and until when) it drains.
    pub async fn heartbeat(&self, request: &HeartbeatRequest) -> Result<(), StoreError> {
        let deadline = (request.draining && request.drain_deadline_ms > 0)
            .then(|| DateTime::<Utc>::from_timestamp_millis(request.drain_deadline_ms))
            .flatten();
        sqlx::query(
            "INSERT INTO spawners (spawner_id, heartbeat_at, owned_runs, draining_since, drain_deadline)
             VALUES ($1, now(), $2, CASE WHEN $3 THEN now() END, $4)
             ON CONFLICT (spawner_id) DO UPDATE SET heartbeat_at = now(), owned_runs = $2,
                 draining_since = CASE WHEN $3 THEN COALESCE(spawners.draining_since, now()) END,
                 drain_deadline = $4",
        )
        .bind(&request.spawner_id)
        .bind(request.owned_runs as i32)
        .bind(request.draining)
        .bind(deadline)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
