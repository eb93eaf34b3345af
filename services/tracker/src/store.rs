//! The tracker's SQL for runs. Every change to a run is a compare-and-set
//! on its `version`, decided by [`crate::state::next`], and records a row in
//! `run_transitions` in the same statement: the run's history and the
//! lifecycle outbox ([`crate::relay`] announces the rows).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use corral_proto::v1::{
    ClaimRequest, DueRun, HeartbeatRequest, ListRunsRequest, RecordSandboxRequest, Run, RunCommand,
    RunEvent, RunSpec, RunState, StopCommand, SweepRequest, TransitionRequest, claim_reply,
    due_run, stop_reply, tracker_error::Refusal,
};
use prost::Message;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{FromRow, PgPool};

use crate::state::{self, Illegal};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("run {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Illegal(#[from] Illegal),
    /// Refused, and why: `NotOwner` is a forbidden request, the others
    /// conflicts with the run's state.
    #[error("{1}")]
    Refused(Refusal, String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Defaults applied to a run's spec when its fields are zero.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub timeout_secs: i32,
    pub idle_timeout_secs: i32,
    /// Kept runs: idle seconds before the sandbox is paused.
    pub idle_pause_secs: i32,
    /// Kept runs: the session's lifetime, seconds.
    pub max_lifetime_secs: i32,
}

/// How long an instance pausing or resuming a kept run holds it; a holder
/// that died lets go by itself after this.
const HOLD_SECS: i32 = 30;

/// A transition that was committed (its row in `run_transitions` is what
/// the relay announces).
#[derive(Clone, Debug)]
pub struct Applied {
    pub from: RunState,
    pub event: RunEvent,
    pub actor: String,
    pub run: Run,
}

const COLUMNS: &str = "run_id, state, version, spec, labels, provider, requested_by, owner, \
    sandbox_id, sandbox_epoch, exit_code, reason, timeout_secs, idle_timeout_secs, deadline_at, \
    last_activity_at, stop_requested_at, stop_reason, stop_requested_by, created_at, booting_at, \
    running_at, finalizing_at, finished_at, updated_at, session_id, turn, idle_at, paused_at, \
    idle_pause_secs, resource_class";

/// How often a compare-and-set is retried when another writer raced it.
const CAS_ATTEMPTS: usize = 8;

#[derive(FromRow, Clone, Debug)]
struct RunRow {
    run_id: String,
    state: String,
    version: i64,
    spec: Vec<u8>,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
    provider: String,
    requested_by: String,
    owner: Option<String>,
    sandbox_id: Option<String>,
    sandbox_epoch: i32,
    exit_code: Option<i32>,
    reason: String,
    timeout_secs: i32,
    idle_timeout_secs: i32,
    deadline_at: Option<DateTime<Utc>>,
    last_activity_at: Option<DateTime<Utc>>,
    stop_requested_at: Option<DateTime<Utc>>,
    stop_reason: Option<String>,
    stop_requested_by: Option<String>,
    created_at: DateTime<Utc>,
    booting_at: Option<DateTime<Utc>>,
    running_at: Option<DateTime<Utc>>,
    finalizing_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    session_id: Option<String>,
    turn: i32,
    idle_at: Option<DateTime<Utc>>,
    paused_at: Option<DateTime<Utc>>,
    idle_pause_secs: i32,
    resource_class: String,
}

/// A row as an UPDATE left it, with the state it had before.
#[derive(FromRow)]
struct AppliedRow {
    prev_state: String,
    #[sqlx(flatten)]
    row: RunRow,
}

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

/// [`COLUMNS`] qualified by a table alias.
fn prefixed_columns(alias: &str) -> String {
    COLUMNS
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(at: Option<DateTime<Utc>>) -> i64 {
    at.map(|t| t.timestamp_millis()).unwrap_or(0)
}

impl RunRow {
    fn state(&self) -> RunState {
        RunState::from_name(&self.state).unwrap_or(RunState::Unspecified)
    }

    fn to_proto(&self) -> Run {
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

/// Optional changes that ride along with a transition.
#[derive(Default)]
struct Changes<'a> {
    reason: &'a str,
    actor: &'a str,
    exit_code: Option<i32>,
    owner: Option<&'a str>,
    /// turn_end: the agent's session id (None keeps the recorded one).
    session_id: Option<&'a str>,
}

pub struct Store {
    pool: PgPool,
    defaults: Defaults,
    prices: crate::cost::Prices,
}

impl Store {
    /// Connects and applies the migrations.
    pub async fn connect(
        database_url: &str,
        pool_size: u32,
        defaults: Defaults,
        prices: crate::cost::Prices,
    ) -> Result<Store, StoreError> {
        let options: PgConnectOptions = database_url.parse()?;
        let connect = || {
            PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
        };
        let pool = match connect().await {
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("3D000") => {
                create_database(&options).await?;
                connect().await?
            }
            other => other?,
        };
        // Event ingest keeps its own migrations in the same table.
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(Store {
            pool,
            defaults,
            prices,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn load(&self, run_id: &str) -> Result<RunRow, StoreError> {
        sqlx::query_as::<_, RunRow>(&format!("SELECT {COLUMNS} FROM runs WHERE run_id = $1"))
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(run_id.to_owned()))
    }

    /// The run, with its cost so far.
    pub async fn get(&self, run_id: &str) -> Result<Run, StoreError> {
        let mut runs = vec![self.load(run_id).await?.to_proto()];
        self.with_cost(&mut runs).await?;
        Ok(runs.remove(0))
    }

    /// Fills in each run's cost so far (one query for all).
    async fn with_cost(&self, runs: &mut [Run]) -> Result<(), StoreError> {
        let ids: Vec<String> = runs.iter().map(|r| r.run_id.clone()).collect();
        let billed = crate::cost::billed_of_runs(&self.pool, &ids).await?;
        for run in runs {
            let billed = billed.get(&run.run_id).copied().unwrap_or_default();
            run.billed_running_ms = billed.running_ms;
            run.billed_paused_ms = billed.paused_ms;
            run.cost_usd = self
                .prices
                .cost(&run.provider, &run.resource_class, &billed);
        }
        Ok(())
    }

    /// Cost of the runs matching `request`, grouped.
    pub async fn cost(
        &self,
        request: &corral_proto::v1::CostRequest,
    ) -> Result<corral_proto::v1::CostReply, StoreError> {
        crate::cost::report(&self.pool, &self.prices, request).await
    }

    /// Inserts the run as pending unless it exists. Returns the run and the
    /// creation, if this call created it.
    pub async fn submit(&self, command: &RunCommand) -> Result<(Run, Option<Applied>), StoreError> {
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
        match inserted {
            Some(row) => {
                let run = row.to_proto();
                let applied = Applied {
                    from: RunState::Unspecified,
                    event: RunEvent::Unspecified,
                    actor: command.requested_by.clone(),
                    run: run.clone(),
                };
                Ok((run, Some(applied)))
            }
            None => Ok((self.get(&command.run_id).await?, None)),
        }
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
        let (_, created) = self.submit(command).await?;
        let mut applied: Vec<Applied> = created.into_iter().collect();
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

    /// Whether PostgreSQL answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
    async fn apply(
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
        let guard = match event {
            RunEvent::BeginFinalize => {
                "AND r.stop_requested_at IS NULL AND (r.deadline_at IS NULL OR r.deadline_at > now())"
            }
            RunEvent::Start => "AND r.stop_requested_at IS NULL AND r.sandbox_id IS NOT NULL",
            RunEvent::Claim | RunEvent::TurnEnd => "AND r.stop_requested_at IS NULL",
            // Between turns the owner column is a short hold: whoever
            // pauses, resumes or continues the run holds it, and nobody else
            // acts on the sandbox meanwhile (a hold older than HOLD_SECS is
            // from an instance that died).
            RunEvent::Continue | RunEvent::Pause | RunEvent::Resume => {
                "AND r.stop_requested_at IS NULL AND (r.deadline_at IS NULL OR r.deadline_at > now())
                 AND (r.owner IS NULL OR r.owner = $6 OR r.updated_at < now() - make_interval(secs => $HOLD))"
            }
            _ => "",
        };
        let mut guard = guard.replace("$HOLD", &HOLD_SECS.to_string());
        if owner_only(event) {
            guard.push_str(OWNER_GUARD);
        }
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

    /// Records a stop durably. A pending run is stopped at once (no owner has
    /// it yet); a live one keeps its state for the owner (or the reaper) to
    /// end, and its version changes, which closes the finalize fence.
    /// With `remember_unknown`, a stop for a run not recorded yet is kept
    /// and applies when the run appears (the outcome is still `NotFound`).
    pub async fn request_stop(
        &self,
        stop: &StopCommand,
        remember_unknown: bool,
    ) -> Result<(stop_reply::Outcome, Option<Run>, Option<Applied>), StoreError> {
        use stop_reply::Outcome;
        let requested_by = if stop.requested_by.is_empty() {
            "unknown"
        } else {
            stop.requested_by.as_str()
        };
        for _ in 0..CAS_ATTEMPTS {
            let row = match self.load(&stop.run_id).await {
                Ok(row) => row,
                Err(StoreError::NotFound(_)) => {
                    if remember_unknown {
                        sqlx::query(
                            "INSERT INTO early_stops (run_id, reason, requested_by) VALUES ($1, $2, $3)
                             ON CONFLICT (run_id) DO NOTHING",
                        )
                        .bind(&stop.run_id)
                        .bind(&stop.reason)
                        .bind(requested_by)
                        .execute(&self.pool)
                        .await?;
                        // The run may have been created in between.
                        if let Ok(run) = self.get(&stop.run_id).await {
                            return Ok((Outcome::NotFound, Some(run), None));
                        }
                    }
                    return Ok((Outcome::NotFound, None, None));
                }
                Err(err) => return Err(err),
            };
            let state = row.state();
            if state.is_terminal() {
                return Ok((Outcome::AlreadyTerminal, Some(row.to_proto()), None));
            }
            if row.stop_requested_at.is_some() {
                let outcome = if state == RunState::Finalizing {
                    Outcome::FinalizeInProgress
                } else {
                    Outcome::AlreadyRequested
                };
                return Ok((outcome, Some(row.to_proto()), None));
            }
            let recorded = sqlx::query_as::<_, RunRow>(&format!(
                "UPDATE runs SET stop_requested_at = now(), stop_reason = $3, stop_requested_by = $4,
                     version = version + 1, updated_at = now()
                 WHERE run_id = $1 AND version = $2
                 RETURNING {COLUMNS}"
            ))
            .bind(&stop.run_id)
            .bind(row.version)
            .bind(&stop.reason)
            .bind(requested_by)
            .fetch_optional(&self.pool)
            .await?;
            let Some(recorded) = recorded else { continue };
            if state == RunState::Finalizing {
                return Ok((Outcome::FinalizeInProgress, Some(recorded.to_proto()), None));
            }
            if state == RunState::Pending {
                let changes = Changes {
                    reason: &stop.reason,
                    actor: requested_by,
                    ..Default::default()
                };
                match self.apply(&recorded, RunEvent::Stop, changes).await? {
                    Some(applied) => {
                        let run = applied.run.clone();
                        return Ok((Outcome::Accepted, Some(run), Some(applied)));
                    }
                    // Claimed in between: the owner will stop it.
                    None => {
                        return Ok((Outcome::Accepted, Some(self.get(&stop.run_id).await?), None));
                    }
                }
            }
            return Ok((Outcome::Accepted, Some(recorded.to_proto()), None));
        }
        Err(StoreError::Refused(
            Refusal::Contended,
            format!(
                "run {} kept changing while a stop was recorded",
                stop.run_id
            ),
        ))
    }

    /// Newest first, filtered by states and labels, paged by `before_run_id`.
    pub async fn list(&self, request: &ListRunsRequest) -> Result<Vec<Run>, StoreError> {
        let states: Option<Vec<String>> = if request.states.is_empty() {
            None
        } else {
            Some(
                request
                    .states
                    .iter()
                    .map(|s| {
                        RunState::try_from(*s)
                            .unwrap_or(RunState::Unspecified)
                            .name()
                            .to_owned()
                    })
                    .collect(),
            )
        };
        let labels: BTreeMap<String, String> = request.labels.clone().into_iter().collect();
        let limit = if request.limit == 0 {
            100
        } else {
            request.limit.min(10_000)
        };
        let cursor = (!request.before_run_id.is_empty()).then_some(request.before_run_id.as_str());
        let rows = sqlx::query_as::<_, RunRow>(&format!(
            "SELECT {COLUMNS} FROM runs
             WHERE ($1::text[] IS NULL OR state = ANY($1))
               AND labels @> $2
               AND ($3::text IS NULL OR (created_at, run_id) <
                    (SELECT created_at, run_id FROM runs WHERE run_id = $3))
             ORDER BY created_at DESC, run_id DESC
             LIMIT $4"
        ))
        .bind(states)
        .bind(sqlx::types::Json(labels))
        .bind(cursor)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut runs: Vec<Run> = rows.iter().map(RunRow::to_proto).collect();
        self.with_cost(&mut runs).await?;
        Ok(runs)
    }

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

    /// Live runs the reaper must act on, each with the first reason that
    /// applies. Scans the live-runs partial index only.
    /// Every live run, with only what reconciliation needs: run id, state,
    /// owner, sandbox id and epoch, version.
    /// One page of live runs by run id: those after `after`, at most
    /// `limit`, and the cursor of the next page ("" when this is the last).
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

    /// The spawners that heartbeat within the last ten minutes, by id.
    pub async fn spawners(&self) -> Result<Vec<corral_proto::v1::Spawner>, StoreError> {
        type Row = (
            String,
            DateTime<Utc>,
            i32,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT spawner_id, heartbeat_at, owned_runs, draining_since, drain_deadline
             FROM spawners WHERE heartbeat_at > now() - interval '10 minutes'
             ORDER BY spawner_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let ms = |t: Option<DateTime<Utc>>| t.map_or(0, |t| t.timestamp_millis());
        Ok(rows
            .into_iter()
            .map(
                |(spawner_id, heartbeat_at, owned, since, deadline)| corral_proto::v1::Spawner {
                    spawner_id,
                    heartbeat_at_ms: heartbeat_at.timestamp_millis(),
                    owned_runs: owned.max(0) as u32,
                    draining_since_ms: ms(since),
                    drain_deadline_ms: ms(deadline),
                },
            )
            .collect())
    }
}

/// Creates the database `options` names (a fresh machine has none), through
/// the server's `postgres` maintenance database.
async fn create_database(options: &PgConnectOptions) -> Result<(), StoreError> {
    use sqlx::Connection;
    let name = options.get_database().unwrap_or("corral").to_owned();
    tracing::info!(database = %name, "creating the database");
    let mut conn = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match sqlx::query(&format!("CREATE DATABASE {quoted}"))
        .execute(&mut conn)
        .await
    {
        // Another instance created it first.
        Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => Ok(()),
        Err(err) => Err(err.into()),
        Ok(_) => Ok(()),
    }
}

fn nonzero(value: i32, default: i32) -> i32 {
    if value == 0 { default } else { value }
}

/// Events that, on a run someone owns (booting, running, finalizing), only
/// its owner or the reaper may apply.
fn owner_only(event: RunEvent) -> bool {
    matches!(
        event,
        RunEvent::Start
            | RunEvent::BeginFinalize
            | RunEvent::Complete
            | RunEvent::Fail
            | RunEvent::Stop
            | RunEvent::TimeOut
            | RunEvent::TurnEnd
    )
}

/// The rule of [`owner_only`] in SQL (`$6` the request's owner, `$9` its
/// actor): one place, [`not_owner`] says why in words.
const OWNER_GUARD: &str = " AND (r.state NOT IN ('booting', 'running', 'finalizing')
    OR r.owner IS NULL OR r.owner = $6 OR $9 LIKE 'reaper:%')";

/// Why `owner` (acting as `actor`) may not apply `event` to `row`, if so.
fn not_owner(row: &RunRow, event: RunEvent, owner: &str, actor: &str) -> Option<String> {
    let owned = matches!(
        row.state(),
        RunState::Booting | RunState::Running | RunState::Finalizing
    );
    let held = row.owner.as_deref()?;
    (owner_only(event) && owned && held != owner && !actor.starts_with("reaper:")).then(|| {
        format!(
            "run {} is owned by {held}: only its owner or the reaper may {} it ({actor:?} as owner {owner:?} may not)",
            row.run_id,
            event.name()
        )
    })
}

/// Why a fenced event may not apply to this row, if it may not.
fn fence(row: &RunRow, event: RunEvent, owner: &str) -> Option<(Refusal, String)> {
    let between_turns = matches!(
        event,
        RunEvent::Continue | RunEvent::Pause | RunEvent::Resume
    );
    match event {
        RunEvent::BeginFinalize | RunEvent::Start | RunEvent::TurnEnd
            if row.stop_requested_at.is_some() =>
        {
            Some((
                Refusal::StopRequested,
                format!("stop requested for run {}", row.run_id),
            ))
        }
        _ if between_turns && row.stop_requested_at.is_some() => Some((
            Refusal::StopRequested,
            format!("stop requested for run {}", row.run_id),
        )),
        _ if (between_turns || event == RunEvent::BeginFinalize)
            && row.deadline_at.is_some_and(|d| d <= Utc::now()) =>
        {
            Some((
                Refusal::DeadlinePassed,
                format!("deadline passed for run {}", row.run_id),
            ))
        }
        _ if between_turns
            && row.owner.as_deref().is_some_and(|held| {
                held != owner
                    && row.updated_at > Utc::now() - chrono::Duration::seconds(HOLD_SECS.into())
            }) =>
        {
            Some((
                Refusal::HeldByAnother,
                format!(
                    "run {} is held by {} (pausing or resuming); try again",
                    row.run_id,
                    row.owner.as_deref().unwrap_or_default()
                ),
            ))
        }
        RunEvent::Start if row.sandbox_id.is_none() => Some((
            Refusal::NoSandbox,
            format!(
                "run {} has no recorded sandbox id; record it before start",
                row.run_id
            ),
        )),
        _ => None,
    }
}
