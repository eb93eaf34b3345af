//! The persisting consumer: pulls batches from the durable consumer
//! `event-ingest` on the events stream, stores each batch in one bulk insert
//! (`ON CONFLICT (run_id, event_id) DO NOTHING`), and acks only after the
//! commit, so redelivery, duplicate posts and restarts never create a second
//! row and nothing acknowledged is lost. Progress events are reported as
//! activity.
//!
//! Nothing stalls it: NUL characters are replaced before storing; an event
//! that does not decode, lacks its ids, has a time out of range or names
//! another run than its subject is dead-lettered; a batch the database
//! refuses is split until the event at fault is alone and dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use corral_client::ActivityReporter;
use corral_proto::Subjects;
use corral_proto::v1::AgentEvent;
use futures::StreamExt;
use prost::Message;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Row};
use crate::{Error, wire};

pub const CONSUMER: &str = "event-ingest";

pub async fn run(
    js: jetstream::Context,
    subjects: Subjects,
    pool: PgPool,
    activity: Arc<ActivityReporter>,
    batch_max: usize,
    max_diff: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let stream = js
        .get_stream(subjects.events_stream())
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subject: subjects.events_all(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: (batch_max * 4) as i64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(1));
    loop {
        if shutdown.is_cancelled() {
            // Let the batches in hand finish (their acks follow their commits).
            let _ = in_flight.acquire().await;
            return Ok(());
        }
        let fetched = consumer
            .fetch()
            .max_messages(batch_max.max(1))
            .expires(Duration::from_millis(500))
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
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => batch.push(message),
                Err(err) => tracing::warn!(error = %err, "event delivery error"),
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut rows = Vec::with_capacity(batch.len());
        let mut good = Vec::with_capacity(batch.len());
        for message in batch {
            let stream_seq = message
                .info()
                .map(|i| i.stream_sequence as i64)
                .unwrap_or(0);
            let mut event = match AgentEvent::decode(message.payload.clone()) {
                Ok(event) => event,
                Err(err) => {
                    let reason = format!("payload did not decode as AgentEvent: {err}");
                    dead_letter(&js, &subjects, &message, &reason).await;
                    continue;
                }
            };
            if let Err(reason) = check(&subjects, &message.subject, &event) {
                dead_letter(&js, &subjects, &message, &reason).await;
                continue;
            }
            // PostgreSQL text cannot hold NUL (what `cat` of a binary file
            // prints): replaced, counted, never a batch that cannot be stored.
            let (mut data, truncated) = wire::data_json(&event, max_diff);
            let replaced = wire::scrub_json(&mut data)
                + wire::scrub(&mut event.event_id)
                + wire::scrub(&mut event.kind);
            if replaced > 0 {
                metrics::counter!("corral_event_nul_replaced_total").increment(replaced as u64);
            }
            if corral_proto::kinds::is_progress(&event.kind) {
                activity.note(&event.run_id);
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
            good.push(message);
        }
        // Store while the next batch is fetched, one batch at a time so that
        // commits follow the stream order (pages by cursor never skip).
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return Ok(());
        };
        let pool = pool.clone();
        let (js, subjects) = (js.clone(), subjects.clone());
        tokio::spawn(async move {
            store_batch(&js, &subjects, &pool, rows, good).await;
            drop(permit);
        });
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
async fn store_batch(
    js: &jetstream::Context,
    subjects: &Subjects,
    pool: &PgPool,
    rows: Vec<Row>,
    messages: Vec<jetstream::Message>,
) {
    // Halves are stored in stream order: the left one first.
    let mut pending = vec![(rows, messages)];
    while let Some((mut rows, mut messages)) = pending.pop() {
        match store::insert(pool, &rows).await {
            Ok(new) => {
                metrics::counter!("corral_events_ingested_total").increment(new);
                let now = corral_common::now_ms();
                for row in &rows {
                    metrics::histogram!("corral_ingest_lag_seconds")
                        .record((now - row.at_ms).max(0) as f64 / 1000.0);
                }
                futures::future::join_all(messages.iter().map(|m| m.ack())).await;
            }
            Err(err) if store::is_transient(&err) => {
                tracing::warn!(error = %err, events = rows.len(), "event batch not stored, will retry");
                let nak = AckKind::Nak(Some(Duration::from_secs(1)));
                futures::future::join_all(messages.iter().map(|m| m.ack_with(nak))).await;
            }
            Err(err) if rows.len() == 1 => {
                let reason = format!("event could not be stored: {err}");
                dead_letter(js, subjects, &messages[0], &reason).await;
            }
            Err(err) => {
                tracing::warn!(error = %err, events = rows.len(), "event batch refused, isolating the event at fault");
                let half = rows.len() / 2;
                let (right_rows, right_messages) = (rows.split_off(half), messages.split_off(half));
                pending.push((right_rows, right_messages));
                pending.push((rows, messages));
            }
        }
    }
}

async fn dead_letter(
    js: &jetstream::Context,
    subjects: &Subjects,
    message: &jetstream::Message,
    reason: &str,
) {
    tracing::warn!(subject = %message.subject, reason, "dead-lettering event");
    if let Err(err) =
        corral_common::nats::dead_letter(js, subjects, "events", message, reason).await
    {
        tracing::error!(error = %err, "dead-letter publish failed; the event will be redelivered");
    }
}
