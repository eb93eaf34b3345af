//! The persisting consumer: pulls batches from the durable consumer
//! `event-ingest` on the events stream, stores each batch in one bulk insert
//! (`ON CONFLICT (run_id, event_id) DO NOTHING`), and acks only after the
//! commit, so redelivery, duplicate posts and restarts never create a second
//! row and nothing acknowledged is lost. Progress events other than output
//! lines (which their spawner reports) are reported as activity.
//!
//! Nothing stalls it: NUL characters are replaced before storing; an event
//! that does not decode, lacks its ids, has a time out of range or names
//! another run than its subject is dead-lettered; a batch the database
//! refuses is split until the event at fault is alone and dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use corral_client::ActivityReporter;
use corral_common::delivery::{DeadLetters, Delivery};
use corral_proto::Subjects;
use corral_proto::v1::AgentEvent;
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Row};
use crate::{Error, wire};

pub const CONSUMER: &str = "event-ingest";

/// Batches being stored at once: one commit's round trip to PostgreSQL
/// overlaps the next batch's insert.
const STORE_IN_FLIGHT: usize = 4;

/// How long a batch the database could not take waits before it is tried again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// How long the server holds one fetch (its pull request) open.
const FETCH_EXPIRES: Duration = Duration::from_millis(500);

/// How long past [`FETCH_EXPIRES`] a fetch is waited for before it counts
/// as over. nats-server 2.9 sometimes forgets a pull request without
/// answering it (a consumer info at the wrong moment is enough); the
/// client library would wait five more seconds, storing nothing meanwhile.
const FETCH_GRACE: Duration = Duration::from_millis(250);

/// How old a watermark readers may be given: pages and traces see events
/// at most this much later than they were stored, and NATS is asked at
/// most this often.
const WATERMARK_FRESH: Duration = Duration::from_millis(1000);

/// The settled watermark: the persisting consumer's ack floor, a stream
/// sequence up to which every event is stored or dead-lettered (acks follow
/// commits). Read from NATS at most once per [`WATERMARK_FRESH`] however
/// many pages and traces ask: each read is a consumer info, which on
/// nats-server 2.9 recounts the consumer's pending messages under its lock
/// and can lose its waiting pull request; four readers asking for every page
/// stalled storage for minutes (`corral bench ingest --readers 4`). An older
/// floor is still a floor: pages stay gap-free.
pub struct Watermark {
    js: jetstream::Context,
    subjects: Subjects,
    /// The floor and when NATS said it; the lock makes one reader ask
    /// while the others wait for its answer.
    last: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
}

impl Watermark {
    pub fn new(js: jetstream::Context, subjects: Subjects) -> Watermark {
        Watermark {
            js,
            subjects,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The floor, as NATS said it within [`WATERMARK_FRESH`].
    pub async fn get(&self) -> Result<i64, String> {
        let mut last = self.last.lock().await;
        if let Some((floor, asked)) = *last
            && asked.elapsed() < WATERMARK_FRESH
        {
            return Ok(floor);
        }
        // Getting the consumer is one consumer info; its answer has the floor.
        let consumer: consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(CONSUMER, self.subjects.events_stream())
            .await
            .map_err(|err| format!("event persister: {err}"))?;
        let floor = consumer.cached_info().ack_floor.stream_sequence as i64;
        *last = Some((floor, std::time::Instant::now()));
        Ok(floor)
    }
}

pub async fn run(
    js: jetstream::Context,
    subjects: Subjects,
    pool: PgPool,
    activity: Arc<ActivityReporter>,
    batch_max: usize,
    max_diff: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let consumer = corral_common::streams::pull_consumer_patiently(
        &js,
        &subjects.events_stream(),
        consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            filter_subject: subjects.events_all(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (batch_max * (STORE_IN_FLIGHT + 2)) as i64,
            ..Default::default()
        },
    )
    .await
    .map_err(Error::Nats)?;
    let persister = Arc::new(Persister {
        dead_letters: DeadLetters::new(js.clone(), &subjects, "events"),
        subjects,
        pool,
        activity,
        max_diff,
        in_flight: Arc::new(tokio::sync::Semaphore::new(STORE_IN_FLIGHT)),
    });
    // Fetches cut short, still draining.
    let mut draining = tokio::task::JoinSet::new();
    loop {
        if shutdown.is_cancelled() {
            // Let the batches in hand finish (their acks follow their commits).
            while draining.join_next().await.is_some() {}
            let _ = persister
                .in_flight
                .acquire_many(STORE_IN_FLIGHT as u32)
                .await;
            return Ok(());
        }
        let fetched = consumer
            .fetch()
            .max_messages(batch_max.max(1))
            .expires(FETCH_EXPIRES)
            .messages()
            .await;
        let mut messages = match fetched {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(error = %err, "event fetch failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut batch = Vec::new();
        let over = tokio::time::Instant::now() + FETCH_EXPIRES + FETCH_GRACE;
        loop {
            match tokio::time::timeout_at(over, messages.next()).await {
                Ok(Some(Ok(message))) => batch.push(message),
                Ok(Some(Err(err))) => tracing::warn!(error = %err, "event delivery error"),
                Ok(None) => break,
                Err(_) => {
                    // Not answered in time: the next fetch starts now, and
                    // this one keeps its inbox until the client gives up on
                    // it, so what it still brings is stored, not left to
                    // wait out ack_wait.
                    metrics::counter!("corral_event_fetch_unanswered_total").increment(1);
                    tracing::debug!(
                        events = batch.len(),
                        "fetch not answered in time, fetching again"
                    );
                    let persister = persister.clone();
                    draining.spawn(async move {
                        let late: Vec<_> =
                            messages.filter_map(|m| async { m.ok() }).collect().await;
                        persister.store(late).await;
                    });
                    break;
                }
            }
        }
        while draining.try_join_next().is_some() {}
        if !persister.store(batch).await {
            return Ok(());
        }
    }
}

/// What storing a batch needs.
struct Persister {
    subjects: Subjects,
    pool: PgPool,
    activity: Arc<ActivityReporter>,
    dead_letters: DeadLetters,
    max_diff: usize,
    /// Batches being stored at once ([`STORE_IN_FLIGHT`]).
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Persister {
    /// Decodes `batch` (dead-lettering what is not an event) and starts
    /// storing it once fewer than [`STORE_IN_FLIGHT`] batches are; false
    /// when storing has been closed.
    async fn store(&self, batch: Vec<jetstream::Message>) -> bool {
        if batch.is_empty() {
            return true;
        }
        let subjects = &self.subjects;
        let mut rows = Vec::with_capacity(batch.len());
        let mut good = Vec::with_capacity(batch.len());
        for message in batch {
            let subject = message.subject.clone();
            let valid = |event: &AgentEvent| check(subjects, &subject, event);
            let Some(mut delivery) = Delivery::decode(message, &self.dead_letters, valid).await
            else {
                continue;
            };
            let stream_seq = delivery.stream_sequence() as i64;
            // The event moves into its row; the delivery stays for the ack.
            let mut event = std::mem::take(delivery.value_mut());
            // PostgreSQL text cannot hold NUL (what `cat` of a binary file
            // prints): replaced, counted, never a batch that cannot be stored.
            let (mut data, truncated) = wire::data_json(&event, self.max_diff);
            let replaced = wire::scrub_json(&mut data)
                + wire::scrub(&mut event.event_id)
                + wire::scrub(&mut event.kind);
            if replaced > 0 {
                metrics::counter!("corral_event_nul_replaced_total").increment(replaced as u64);
            }
            // Output lines are the spawner's own: it reports them as
            // activity when it prints them; reporting them again here would
            // double the tracker's activity writes for nothing.
            if event.kind != "agent.output" && corral_proto::kinds::is_progress(&event.kind) {
                self.activity.note(&event.run_id);
            }
            rows.push(Row {
                event_id: event.event_id,
                run_id: event.run_id,
                stream_seq,
                seq: event.seq as i64,
                kind: event.kind,
                at_ms: event.at_ms,
                data,
                truncated,
            });
            good.push(delivery);
        }
        // Store while the next batches are fetched. Commits may land out of
        // stream order; pages still never skip, as they read only up to the
        // consumer's ack floor ([`Watermark`]), and acks follow commits.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return false;
        };
        let pool = self.pool.clone();
        tokio::spawn(async move {
            store_batch(&pool, rows, good).await;
            drop(permit);
        });
        true
    }
}

/// What a decoded event must be to be stored: ids present, a time in
/// range, and the run its subject names (`<p>.events.<run_id>.<kind>`).
fn check(subjects: &Subjects, subject: &str, event: &AgentEvent) -> Result<(), String> {
    if event.event_id.is_empty() || event.run_id.is_empty() {
        return Err("AgentEvent needs event_id and run_id".into());
    }
    corral_proto::validate::event_at_ms(event.at_ms)?;
    let of_subject = subjects.run_of_event(subject).unwrap_or_default();
    if of_subject != event.run_id {
        return Err(format!(
            "run_id {:?} differs from the subject's run {of_subject:?}",
            event.run_id
        ));
    }
    Ok(())
}

/// Stores one batch, then acks its messages. A database error that retrying
/// cannot fix splits the batch until the event at fault is alone, which is
/// dead-lettered with the error while the rest is stored; a transient one
/// naks the messages for redelivery.
async fn store_batch(pool: &PgPool, rows: Vec<Row>, deliveries: Vec<Delivery<AgentEvent>>) {
    // Halves are stored in stream order: the left one first.
    let mut pending = vec![(rows, deliveries)];
    while let Some((mut rows, mut deliveries)) = pending.pop() {
        match store::insert(pool, &rows).await {
            Ok(new) => {
                metrics::counter!("corral_events_ingested_total").increment(new);
                let now = corral_common::now_ms();
                for row in &rows {
                    metrics::histogram!("corral_ingest_lag_seconds")
                        .record((now - row.at_ms).max(0) as f64 / 1000.0);
                }
                futures::future::join_all(deliveries.into_iter().map(Delivery::ack)).await;
            }
            Err(err) if store::is_transient(&err) => {
                tracing::warn!(error = %err, events = rows.len(), "event batch not stored, will retry");
                let retry = |delivery: Delivery<AgentEvent>| delivery.nak_after(STORE_RETRY);
                futures::future::join_all(deliveries.into_iter().map(retry)).await;
            }
            Err(err) if rows.len() == 1 => {
                let reason = format!("event could not be stored: {err}");
                if let Some(delivery) = deliveries.pop() {
                    delivery.dead_letter(&reason).await;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, events = rows.len(), "event batch refused, isolating the event at fault");
                let half = rows.len() / 2;
                let right = (rows.split_off(half), deliveries.split_off(half));
                pending.push(right);
                pending.push((rows, deliveries));
            }
        }
    }
}
