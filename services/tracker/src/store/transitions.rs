//! Writes to a run: submit, claim, recording its sandbox, applying an event
//! through the state machine (the compare-and-set, `cas`), and a
//! holder's release of a kept run between turns.

use std::collections::BTreeMap;

use corral_proto::v1::{
    ClaimRequest, RecordSandboxRequest, Run, RunCommand, RunEvent, RunState, TransitionRequest,
    claim_reply, tracker_error::Refusal,
};
use prost::Message;

use super::fence::{self, fence, not_owner};
use super::rows::{AppliedRow, COLUMNS, RunRow, prefixed_columns};
use super::{CAS_ATTEMPTS, Store, StoreError};
use crate::state;

/// A transition that was committed (its row in `run_transitions` is what
/// the relay announces).
#[derive(Clone, Debug)]
pub struct Applied {
    pub from: RunState,
    pub event: RunEvent,
    pub actor: String,
    pub run: Run,
}

/// Optional changes that ride along with a transition.
#[derive(Default)]
pub(super) struct Changes<'a> {
    pub(super) reason: &'a str,
    pub(super) actor: &'a str,
    pub(super) exit_code: Option<i32>,
    pub(super) owner: Option<&'a str>,
    /// turn_end: the agent's session id (None keeps the recorded one).
    pub(super) session_id: Option<&'a str>,
}

impl Store {
    /// Inserts the run as pending unless it exists. Returns the run and the
    /// creation, if this call created it.
    pub async fn submit(&self, command: &RunCommand) -> Result<(Run, Option<Applied>), StoreError> {
        match self.create(command).await? {
            Some(created) => Ok((created.run.clone(), Some(created))),
            None => Ok((self.get(&command.run_id).await?, None)),
        }
    }

    /// Inserts the run as pending unless it exists: the creation, if this
    /// call made it (nothing is read back when it already existed).
    async fn create(&self, command: &RunCommand) -> Result<Option<Applied>, StoreError> {
        let spec = command.spec.clone().unwrap_or_default();
        // A kept run's deadline is its session's lifetime.
        let timeout = if spec.keep_alive {
            nonzero(spec.max_lifetime_secs, self.defaults.max_lifetime_secs)
        } else {
            nonzero(spec.timeout_secs, self.defaults.timeout_secs)
        };
        let idle_pause = nonzero(spec.idle_pause_secs, self.defaults.idle_pause_secs);
        let resource_class = if spec.resource_class.is_empty() {
            "default".to_owned()
        } else {
            spec.resource_class.clone()
        };
        let idle = nonzero(spec.idle_timeout_secs, self.defaults.idle_timeout_secs);
        let provider = if spec.provider.is_empty() {
            "local".to_owned()
        } else {
            spec.provider.clone()
        };
        let labels: BTreeMap<String, String> = spec.labels.clone().into_iter().collect();
        let inserted = sqlx::query_as::<_, RunRow>(&format!(
            "WITH i AS (
                INSERT INTO runs (run_id, state, spec, labels, provider, requested_by, timeout_secs,
                                  idle_timeout_secs, stop_requested_at, stop_reason, stop_requested_by,
                                  idle_pause_secs, resource_class)
                SELECT $1, 'pending', $2, $3, $4, $5, $6, $7, e.requested_at, e.reason, e.requested_by,
                       $8, $9
                FROM (SELECT 1) AS one LEFT JOIN early_stops e ON e.run_id = $1
                ON CONFLICT (run_id) DO NOTHING
                RETURNING {COLUMNS}
            ), t AS (
                INSERT INTO run_transitions (run_id, from_state, to_state, event, reason, actor,
                                             version, exit_code, sandbox_id)
                SELECT run_id, NULL, 'pending', 'submit', '', $5, version, exit_code, sandbox_id
                FROM i
            )
            SELECT {COLUMNS} FROM i"
        ))
        .bind(&command.run_id)
        .bind(spec.encode_to_vec())
        .bind(sqlx::types::Json(labels))
        .bind(provider)
        .bind(&command.requested_by)
        .bind(timeout)
        .bind(idle)
        .bind(idle_pause)
        .bind(resource_class)
        .fetch_optional(&self.pool)
        .await?;
        Ok(inserted.map(|row| Applied {
            from: RunState::Unspecified,
            event: RunEvent::Unspecified,
            actor: command.requested_by.clone(),
            run: row.to_proto(),
        }))
    }

    /// A spawner takes the run: pending -> booting with it as owner.
    pub async fn claim(
        &self,
        request: &ClaimRequest,
    ) -> Result<(claim_reply::Outcome, Run, Vec<Applied>), StoreError> {
        use claim_reply::Outcome;
        let command = request
            .command
            .as_ref()
            .ok_or_else(|| StoreError::Invalid("claim without a command".into()))?;
        let actor = format!("spawner:{}", request.owner);
        let claim = || Changes {
            actor: &actor,
            owner: Some(&request.owner),
            ..Default::default()
        };
        // The common case in one statement: a pending run, no stop asked.
        if let Some(done) = self
            .cas(&command.run_id, None, RunEvent::Claim, claim())
            .await?
        {
            let run = done.run.clone();
            return Ok((Outcome::Claimed, run, vec![done]));
        }
        // Most often the run is not there yet: the command outran its
        // submit (`start_run` sends both at once), or the submit was lost.
        // Create it and try the same statement again; only when that fails
        // too (claimed already, a stop asked, ended) is the row read to say
        // why.
        let mut applied: Vec<Applied> = self.create(command).await?.into_iter().collect();
        if let Some(done) = self
            .cas(&command.run_id, None, RunEvent::Claim, claim())
            .await?
        {
            let run = done.run.clone();
            applied.push(done);
            return Ok((Outcome::Claimed, run, applied));
        }
        for _ in 0..CAS_ATTEMPTS {
            let row = self.load(&command.run_id).await?;
            match row.state() {
                RunState::Pending if row.stop_requested_at.is_some() => {
                    let reason = row.stop_reason.clone().unwrap_or_default();
                    let changes = Changes {
                        reason: &reason,
                        actor: "tracker",
                        ..Default::default()
                    };
                    if let Some(done) = self.apply(&row, RunEvent::Stop, changes).await? {
                        let run = done.run.clone();
                        applied.push(done);
                        return Ok((Outcome::Stopped, run, applied));
                    }
                }
                RunState::Pending => {
                    if let Some(done) = self.apply(&row, RunEvent::Claim, claim()).await? {
                        let run = done.run.clone();
                        applied.push(done);
                        return Ok((Outcome::Claimed, run, applied));
                    }
                }
                // The same owner asking again before it recorded a sandbox:
                // its earlier attempt gave up, so this one may proceed.
                RunState::Booting
                    if row.owner.as_deref() == Some(request.owner.as_str())
                        && row.sandbox_id.is_none() =>
                {
                    return Ok((Outcome::Claimed, row.to_proto(), applied));
                }
                state if state.is_terminal() => {
                    return Ok((Outcome::Terminal, row.to_proto(), applied));
                }
                _ => return Ok((Outcome::AlreadyClaimed, row.to_proto(), applied)),
            }
        }
        Err(StoreError::Refused(
            Refusal::Contended,
            format!("run {} kept changing while being claimed", command.run_id),
        ))
    }

    /// Records the sandbox id (and bumps the epoch) while the caller owns
    /// the run and it is live.
    pub async fn record_sandbox(&self, request: &RecordSandboxRequest) -> Result<Run, StoreError> {
        // A replacement (a running turn found its sandbox gone) clears the
        // session id, says why, and is kept in the run's history.
        let row = sqlx::query_as::<_, RunRow>(&format!(
            "WITH u AS (
                UPDATE runs SET sandbox_id = $3, provider = $4, sandbox_epoch = sandbox_epoch + 1,
                    version = version + 1, updated_at = now(),
                    session_id = CASE WHEN $5 <> '' THEN NULL ELSE session_id END,
                    reason = CASE WHEN $5 <> '' THEN $5 ELSE reason END,
                    labels = CASE WHEN $6 <> ''
                        THEN labels || jsonb_build_object('corral.isolation', $6::text)
                        ELSE labels END
                WHERE run_id = $1 AND owner = $2
                  AND state NOT IN ('completed', 'failed', 'stopped', 'timed_out')
                RETURNING {COLUMNS}
            ), t AS (
                INSERT INTO run_transitions (run_id, from_state, to_state, event, reason, actor,
                                             version, exit_code, sandbox_id)
                SELECT run_id, state, state, 'replace_sandbox', $5, 'spawner:' || $2,
                       version, exit_code, sandbox_id
                FROM u WHERE $5 <> ''
            )
            SELECT * FROM u"
        ))
        .bind(&request.run_id)
        .bind(&request.owner)
        .bind(&request.sandbox_id)
        .bind(&request.provider)
        .bind(&request.replaced_because)
        .bind(&request.isolation)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => {
                let current = self.load(&request.run_id).await?;
                let refusal = if current.owner.as_deref() == Some(request.owner.as_str()) {
                    Refusal::NotLive
                } else {
                    Refusal::HeldByAnother
                };
                Err(StoreError::Refused(
                    refusal,
                    format!(
                        "run {} is {} and owned by {:?}, not live and owned by {}",
                        request.run_id,
                        current.state,
                        current.owner.unwrap_or_default(),
                        request.owner
                    ),
                ))
            }
        }
    }

    /// Applies one event through the state machine.
    pub async fn transition(&self, request: &TransitionRequest) -> Result<Applied, StoreError> {
        let event = RunEvent::try_from(request.event)
            .map_err(|_| StoreError::Invalid(format!("unknown event {}", request.event)))?;
        let expected = (request.expected_version != 0).then_some(request.expected_version as i64);
        for _ in 0..CAS_ATTEMPTS {
            let changes = Changes {
                reason: &request.reason,
                actor: &request.actor,
                exit_code: request.exit_code,
                owner: (!request.owner.is_empty()).then_some(request.owner.as_str()),
                session_id: (!request.session_id.is_empty()).then_some(request.session_id.as_str()),
            };
            if let Some(applied) = self.cas(&request.run_id, expected, event, changes).await? {
                return Ok(applied);
            }
            // Refused: say why, or try again if the row merely changed.
            let row = self.load(&request.run_id).await?;
            if let Some(version) = expected
                && row.version != version
            {
                return Err(StoreError::Refused(
                    Refusal::VersionMismatch,
                    format!(
                        "run {} is at version {}, not {version}",
                        request.run_id, row.version
                    ),
                ));
            }
            state::next(row.state(), event)?;
            if let Some((refusal, why)) = fence(&row, event, &request.owner) {
                return Err(StoreError::Refused(refusal, why));
            }
            if let Some(why) = not_owner(&row, event, &request.owner, &request.actor) {
                return Err(StoreError::Refused(Refusal::NotOwner, why));
            }
        }
        Err(StoreError::Refused(
            Refusal::Contended,
            format!(
                "run {} kept changing during {}",
                request.run_id,
                event.name()
            ),
        ))
    }

    /// Compare-and-set of one transition against `row.version`; `None` when
    /// the row changed underneath (the caller reloads and decides again).
    pub(super) async fn apply(
        &self,
        row: &RunRow,
        event: RunEvent,
        changes: Changes<'_>,
    ) -> Result<Option<Applied>, StoreError> {
        self.cas(&row.run_id, Some(row.version), event, changes)
            .await
    }

    /// Applies `event` in one statement when the run is in a state the
    /// state machine accepts it from ([`state::sources`]), its version is
    /// `version` (if given) and the event's fence holds; records the
    /// transition in `run_transitions` in the same statement. `None` when
    /// any condition failed.
    async fn cas(
        &self,
        run_id: &str,
        version: Option<i64>,
        event: RunEvent,
        changes: Changes<'_>,
    ) -> Result<Option<Applied>, StoreError> {
        let sources = state::sources(event);
        let Some(&first) = sources.first() else {
            return Err(StoreError::Invalid(format!(
                "event {} applies to no state",
                event.name()
            )));
        };
        let to = state::next(first, event)?;
        let sources: Vec<&str> = sources.iter().map(|s| s.name()).collect();
        let guard = fence::guard(event);
        let updated = sqlx::query_as::<_, AppliedRow>(&format!(
            "WITH u AS (
                UPDATE runs r SET
                    state = $3,
                    version = r.version + 1,
                    updated_at = now(),
                    reason = CASE WHEN $4 <> '' THEN $4 WHEN $8 = 'continue' THEN '' ELSE r.reason END,
                    exit_code = CASE WHEN $8 = 'continue' THEN NULL ELSE COALESCE($5, r.exit_code) END,
                    -- A kept run between turns has no owner.
                    owner = CASE WHEN $8 = 'turn_end' THEN NULL ELSE COALESCE($6, r.owner) END,
                    session_id = CASE WHEN $8 = 'turn_end' THEN COALESCE($10, r.session_id)
                        ELSE r.session_id END,
                    turn = CASE WHEN $3 = 'booting' THEN 1 WHEN $8 = 'continue' THEN r.turn + 1
                        ELSE r.turn END,
                    idle_at = CASE WHEN $3 = 'idle' THEN now() ELSE r.idle_at END,
                    paused_at = CASE WHEN $3 = 'paused' THEN now() ELSE r.paused_at END,
                    deadline_at = CASE WHEN $3 = 'booting'
                        THEN now() + make_interval(secs => r.timeout_secs) ELSE r.deadline_at END,
                    booting_at = CASE WHEN $3 = 'booting' THEN now() ELSE r.booting_at END,
                    running_at = CASE WHEN $3 = 'running' AND r.running_at IS NULL THEN now() ELSE r.running_at END,
                    last_activity_at = CASE WHEN $3 = 'running' THEN now() ELSE r.last_activity_at END,
                    finalizing_at = CASE WHEN $3 = 'finalizing' THEN now() ELSE r.finalizing_at END,
                    finished_at = CASE WHEN $3 IN ('completed', 'failed', 'stopped', 'timed_out')
                        THEN now() ELSE r.finished_at END,
                    stop_requested_at = CASE WHEN $3 = 'stopped'
                        THEN COALESCE(r.stop_requested_at, now()) ELSE r.stop_requested_at END,
                    stop_reason = CASE WHEN $3 = 'stopped'
                        THEN COALESCE(r.stop_reason, $4) ELSE r.stop_reason END
                FROM (SELECT run_id, state FROM runs WHERE run_id = $1 FOR UPDATE) o
                WHERE r.run_id = o.run_id AND r.state = ANY($7)
                  AND ($2::bigint IS NULL OR r.version = $2) {guard}
                RETURNING o.state AS prev_state, {returning}
            ), t AS (
                INSERT INTO run_transitions (run_id, from_state, to_state, event, reason, actor,
                                             version, exit_code, sandbox_id)
                SELECT run_id, prev_state, state, $8, $4, $9, version, exit_code, sandbox_id FROM u
            )
            SELECT * FROM u",
            returning = prefixed_columns("r"),
        ))
        .bind(run_id)
        .bind(version)
        .bind(to.name())
        .bind(changes.reason)
        .bind(changes.exit_code)
        .bind(changes.owner)
        .bind(&sources)
        .bind(event.name())
        .bind(changes.actor)
        .bind(changes.session_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(updated.map(|applied| Applied {
            from: RunState::from_name(&applied.prev_state).unwrap_or(RunState::Unspecified),
            event,
            actor: changes.actor.to_owned(),
            run: applied.row.to_proto(),
        }))
    }

    /// The instance that paused or resumed a kept run lets go of it.
    pub async fn release(&self, run_id: &str, owner: &str) -> Result<Run, StoreError> {
        let row = sqlx::query_as::<_, RunRow>(&format!(
            "UPDATE runs SET owner = NULL, version = version + 1, updated_at = now()
             WHERE run_id = $1 AND owner = $2 AND state IN ('idle', 'paused')
             RETURNING {COLUMNS}"
        ))
        .bind(run_id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.to_proto()),
            None => Err(StoreError::Refused(
                Refusal::Unspecified,
                format!("run {run_id} is not held by {owner} between turns"),
            )),
        }
    }
}

fn nonzero(value: i32, default: i32) -> i32 {
    if value == 0 { default } else { value }
}
