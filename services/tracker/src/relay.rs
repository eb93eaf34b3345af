//! The lifecycle outbox relay.
//!
//! Every transition writes its row in `run_transitions` in the transition's
//! own statement. The relay publishes the rows nobody has relayed yet, in id
//! order, on `<prefix>.lifecycle.<run_id>` with `Nats-Msg-Id
//! <run_id>:<version>`, and marks them relayed in the same database
//! transaction. So a tracker that dies between a commit and its publish, or
//! a NATS server that is away, delays an announcement but never loses one;
//! a row published twice (a relay died between the stream's ack and its
//! commit) is dropped by the stream's duplicate window.
//!
//! Order per run: transitions of one run are serialized by the run's row
//! lock, so their ids follow their commits; one relay at a time (a
//! transaction-scoped advisory lock) publishes a batch in id order and stops
//! at the first publish that fails, so a later row never overtakes an
//! earlier one.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use corral_common::nats::traced_headers;
use corral_proto::Subjects;
use corral_proto::v1::{LifecycleEvent, RunEvent, RunState};
use prost::Message;
use sqlx::{FromRow, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rows per round.
const BATCH: i64 = 500;
/// How often the relay looks without being woken: rows committed by a
/// tracker that died before it could relay them, or while another tracker
/// held the relay.
const POLL: Duration = Duration::from_millis(500);
/// The advisory lock that lets one relay run at a time (any 64-bit value
/// that nothing else in the database uses).
const RELAY_LOCK: i64 = 0x636f_7272_616c_0001;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database error: {0}")]
    Db(sqlx::Error),
    #[error("publish of {msg_id} failed: {message}")]
    Publish { msg_id: String, message: String },
}

corral_common::from_cause!(sqlx::Error => RelayError::Db);

struct OutboxRow {
    id: i64,
    run_id: String,
    from_state: Option<String>,
    to_state: String,
    event: String,
    reason: String,
    actor: String,
    at: DateTime<Utc>,
    version: Option<i64>,
    exit_code: Option<i32>,
    sandbox_id: Option<String>,
}

/// A row of a round's first statement: whether the relay lock was taken
/// and, if it was, one row to relay (none when nothing is left).
#[derive(FromRow)]
struct Locked {
    held: bool,
    id: Option<i64>,
    run_id: Option<String>,
    from_state: Option<String>,
    to_state: Option<String>,
    event: Option<String>,
    reason: Option<String>,
    actor: Option<String>,
    at: Option<DateTime<Utc>>,
    version: Option<i64>,
    exit_code: Option<i32>,
    sandbox_id: Option<String>,
}

impl Locked {
    fn row(self) -> Option<OutboxRow> {
        Some(OutboxRow {
            id: self.id?,
            run_id: self.run_id?,
            from_state: self.from_state,
            to_state: self.to_state?,
            event: self.event?,
            reason: self.reason?,
            actor: self.actor?,
            at: self.at?,
            version: self.version,
            exit_code: self.exit_code,
            sandbox_id: self.sandbox_id,
        })
    }
}

impl OutboxRow {
    fn msg_id(&self) -> String {
        match self.version {
            Some(version) => format!("{}:{version}", self.run_id),
            None => format!("{}:t{}", self.run_id, self.id),
        }
    }

    fn event(&self) -> LifecycleEvent {
        let state = |name: &str| RunState::from_name(name).unwrap_or(RunState::Unspecified);
        LifecycleEvent {
            run_id: self.run_id.clone(),
            from: self
                .from_state
                .as_deref()
                .map_or(RunState::Unspecified, state) as i32,
            to: state(&self.to_state) as i32,
            event: RunEvent::from_name(&self.event).unwrap_or(RunEvent::Unspecified) as i32,
            reason: self.reason.clone(),
            actor: self.actor.clone(),
            at_ms: self.at.timestamp_millis(),
            version: self.version.unwrap_or_default().max(0) as u64,
            exit_code: self.exit_code,
            sandbox_id: self.sandbox_id.clone().unwrap_or_default(),
        }
    }
}

pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    subjects: Subjects,
    wake: Notify,
}

impl Relay {
    pub fn new(pool: PgPool, js: jetstream::Context, subjects: Subjects) -> Arc<Relay> {
        Arc::new(Relay {
            pool,
            js,
            subjects,
            wake: Notify::new(),
        })
    }

    /// A transition was committed: relay it now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Relays until `shutdown`, then once more for what was committed last.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.wake.notified() => false,
                _ = tokio::time::sleep(POLL) => false,
            };
            match self.drain().await {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures += 1;
                    let delay = Duration::from_millis(100 << failures.min(5));
                    tracing::warn!(error = %err, ?delay, "lifecycle relay failed; the rows stay for the next round");
                    if !stopping {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Rounds until nothing is left (or another relay holds the lock).
    async fn drain(&self) -> Result<(), RelayError> {
        loop {
            match self.round().await? {
                Round::Relayed(n) if n as i64 == BATCH => continue,
                Round::Relayed(_) => return Ok(()),
                Round::Busy => {
                    // Another tracker relays; it may have looked before our
                    // commit, so look again shortly.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.wake();
                    return Ok(());
                }
            }
        }
    }

    async fn round(&self) -> Result<Round, RelayError> {
        let mut tx = self.pool.begin().await?;
        // The lock and the rows in one statement: the lock is taken once
        // (a CTE with a volatile call is evaluated once), and the rows are
        // read only when it was. One row with no id: held, nothing to relay.
        let found: Vec<Locked> = sqlx::query_as(
            "WITH relay AS (SELECT pg_try_advisory_xact_lock($2) AS held)
             SELECT relay.held, t.id, t.run_id, t.from_state, t.to_state, t.event, t.reason,
                    t.actor, t.at, t.version, t.exit_code, t.sandbox_id
             FROM relay LEFT JOIN LATERAL (
                 SELECT id, run_id, from_state, to_state, event, reason, actor, at, version,
                        exit_code, sandbox_id
                 FROM run_transitions WHERE relay.held AND NOT relayed ORDER BY id LIMIT $1
             ) t ON true
             ORDER BY t.id",
        )
        .bind(BATCH)
        .bind(RELAY_LOCK)
        .fetch_all(&mut *tx)
        .await?;
        if !found.first().is_some_and(|row| row.held) {
            return Ok(Round::Busy);
        }
        let rows: Vec<OutboxRow> = found.into_iter().filter_map(Locked::row).collect();
        if rows.is_empty() {
            return Ok(Round::Relayed(0));
        }
        // Sent back to back, acknowledged in order: the stream stores one
        // connection's publishes in the order they were sent.
        let mut acks = Vec::with_capacity(rows.len());
        let mut failed = None;
        for row in &rows {
            let mut headers = traced_headers();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, row.msg_id().as_str());
            let subject = self.subjects.lifecycle(&row.run_id);
            let payload = row.event().encode_to_vec();
            match self
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(err) => {
                    failed = Some((row.msg_id(), err.to_string()));
                    break;
                }
            }
        }
        let mut relayed = Vec::with_capacity(acks.len());
        for (row, ack) in rows.iter().zip(acks) {
            match ack.await {
                Ok(_) => relayed.push(row.id),
                Err(err) => {
                    failed.get_or_insert((row.msg_id(), err.to_string()));
                    break;
                }
            }
        }
        sqlx::query("UPDATE run_transitions SET relayed = true WHERE id = ANY($1)")
            .bind(&relayed)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!("corral_lifecycle_relayed_total").increment(relayed.len() as u64);
        match failed {
            Some((msg_id, message)) => {
                // Announced later, by the next round: a delay, not a loss.
                metrics::counter!("corral_lifecycle_publish_failures_total").increment(1);
                Err(RelayError::Publish { msg_id, message })
            }
            None => Ok(Round::Relayed(relayed.len())),
        }
    }
}

enum Round {
    Relayed(usize),
    Busy,
}
