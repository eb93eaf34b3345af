//! NATS plumbing shared by the services and the client: connecting, the
//! streams (provisioned idempotently), publishing to JetStream with a
//! de-duplication id and trace context while awaiting the PubAck,
//! protobuf request-reply, and dead-lettering.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use corral_proto::{Subjects, headers};

use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {source} (is nats-server running with -js?)")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot provision stream {stream}: {message} (is JetStream enabled, nats-server -js?)")]
    Stream { stream: String, message: String },
    #[error("publish to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("request to {subject} failed: {message}")]
    Request { subject: String, message: String },
    #[error("reply from {subject} did not decode: {source}")]
    Decode {
        subject: String,
        source: prost::DecodeError,
    },
}

impl NatsError {
    /// Whether retrying later may succeed (no responders, timeouts, a
    /// reconnecting client), as opposed to a reply that will never decode.
    pub fn is_transient(&self) -> bool {
        !matches!(self, NatsError::Decode { .. })
    }
}

/// Connects with a client name that shows in `nats-server` monitoring.
pub async fn connect(
    url: &str,
    name: &str,
    request_timeout: Duration,
) -> Result<Client, NatsError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .request_timeout(Some(request_timeout))
        .connect(url)
        .await
        .map_err(|source| NatsError::Connect {
            url: url.to_owned(),
            source,
        })
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The stream configurations, from the subject prefix.
pub fn stream_configs(subjects: &Subjects) -> Vec<stream::Config> {
    vec![
        stream::Config {
            name: subjects.cmd_stream(),
            description: Some("corral commands: run and continue (work queue), stop".into()),
            subjects: vec![subjects.cmd_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: 7 * DAY,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        stream::Config {
            name: subjects.lifecycle_stream(),
            description: Some("corral run state transitions".into()),
            subjects: vec![subjects.lifecycle_all()],
            retention: stream::RetentionPolicy::Limits,
            max_age: 7 * DAY,
            ..Default::default()
        },
        stream::Config {
            name: subjects.events_stream(),
            description: Some("corral agent events".into()),
            subjects: vec![subjects.events_all()],
            retention: stream::RetentionPolicy::Limits,
            max_age: 7 * DAY,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        stream::Config {
            name: subjects.dlq_stream(),
            description: Some(
                "corral dead letters: messages that could not be decoded or applied".into(),
            ),
            subjects: vec![subjects.dlq_all()],
            retention: stream::RetentionPolicy::Limits,
            max_age: 30 * DAY,
            ..Default::default()
        },
    ]
}

/// Creates corral's streams when they are missing; leaves existing ones as
/// they are. Safe to call from every service at every start.
pub async fn ensure_streams(js: &jetstream::Context, subjects: &Subjects) -> Result<(), NatsError> {
    for config in stream_configs(subjects) {
        let name = config.name.clone();
        js.get_or_create_stream(config)
            .await
            .map_err(|err| NatsError::Stream {
                stream: name,
                message: err.to_string(),
            })?;
    }
    Ok(())
}

/// Headers carrying the current trace context.
pub fn traced_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    telemetry::inject(&mut headers);
    headers
}

/// Publishes to JetStream with `Nats-Msg-Id = msg_id` and the trace context,
/// and returns only once the stream acknowledged it.
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
) -> Result<(), NatsError> {
    let mut headers = traced_headers();
    headers.insert(headers::MSG_ID, msg_id);
    let fail = |message: String, subject: &str| NatsError::Publish {
        subject: subject.to_owned(),
        message,
    };
    let ack = js
        .publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|err| fail(err.to_string(), &subject))?;
    ack.await.map_err(|err| fail(err.to_string(), &subject))?;
    Ok(())
}

/// Sends a protobuf request and decodes the protobuf reply.
pub async fn request<Rq, Rp>(
    client: &Client,
    subject: String,
    request: &Rq,
) -> Result<Rp, NatsError>
where
    Rq: prost::Message,
    Rp: prost::Message + Default,
{
    let reply = client
        .request_with_headers(
            subject.clone(),
            traced_headers(),
            request.encode_to_vec().into(),
        )
        .await
        .map_err(|err| NatsError::Request {
            subject: subject.clone(),
            message: err.to_string(),
        })?;
    Rp::decode(reply.payload).map_err(|source| NatsError::Decode { subject, source })
}

/// Copies a message that cannot be processed to `<prefix>.dlq.<what>` with
/// the reason in the `Corral-Error` header, then terminates it on its stream
/// so it is never redelivered. Returns an error (and leaves the message for
/// redelivery) only when the dead-letter publish itself failed.
pub async fn dead_letter(
    js: &jetstream::Context,
    subjects: &Subjects,
    what: &str,
    message: &jetstream::Message,
    error: &str,
) -> Result<(), NatsError> {
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(headers::DLQ_ERROR, sanitize_header(error).as_str());
    headers.insert(headers::DLQ_ORIGINAL_SUBJECT, message.subject.as_str());
    let deliveries = message.info().map(|i| i.delivered).unwrap_or(1);
    headers.insert(headers::DLQ_DELIVERIES, deliveries.to_string().as_str());
    // The dead letter is its own message: a stale Nats-Msg-Id would make the
    // DLQ stream drop it as a duplicate of nothing it holds.
    let mut clean = HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name == headers::MSG_ID {
            // Kept under another name, for `corral dlq replay`.
            for value in values {
                clean.append(headers::DLQ_ORIGINAL_MSG_ID, value.as_str());
            }
            continue;
        }
        for value in values {
            clean.append(name, value.as_str());
        }
    }
    let subject = subjects.dlq(what);
    let ack = js
        .publish_with_headers(subject.clone(), clean, message.payload.clone())
        .await
        .map_err(|err| NatsError::Publish {
            subject: subject.clone(),
            message: err.to_string(),
        })?;
    ack.await.map_err(|err| NatsError::Publish {
        subject: subject.clone(),
        message: err.to_string(),
    })?;
    if let Err(err) = message.ack_with(jetstream::AckKind::Term).await {
        tracing::warn!(error = %err, "dead-lettered message could not be terminated");
    }
    metrics::counter!("corral_dead_letters_total", "kind" => what.to_owned(), "reason" => reason_class(error))
        .increment(1);
    Ok(())
}

/// A dead letter's reason as a metric label: the error up to its first
/// colon, quoted values dropped, at most 48 characters (few distinct values).
pub fn reason_class(error: &str) -> String {
    let head = error.split(':').next().unwrap_or_default();
    let mut class = String::new();
    let mut quoted = false;
    for c in head.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            _ => class.push(c),
        }
    }
    let class: String = class.split_whitespace().collect::<Vec<_>>().join(" ");
    class.chars().take(48).collect()
}

/// Header values are one line of printable text.
fn sanitize_header(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    line.truncate(1024);
    line
}
