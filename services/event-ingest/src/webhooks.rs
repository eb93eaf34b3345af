//! Lifecycle webhooks: every run transition, as signed JSON, POSTed to each
//! configured endpoint (`webhooks.<name>`) that wants it.
//!
//! Each endpoint has a durable pull consumer of its own on the lifecycle
//! stream (`corral-webhook-<name>`, created at start with deliver policy
//! `new`: an endpoint gets the transitions from when it was first
//! configured), so it keeps its own position and a slow or unreachable
//! endpoint holds back no other. Up to `max_in_flight` requests go to one
//! endpoint at once (the consumer's `max_ack_pending`, shared by every
//! ingest instance), so transitions of one run may arrive out of order:
//! `version` orders them.
//!
//! Delivery is at least once. A transition is acknowledged on the stream only
//! after the endpoint answered 2xx; any other answer, no answer within
//! `timeout_ms` or no connection is a failed attempt, retried after
//! `backoff_ms` doubled per attempt (at most `max_backoff_ms`; the stream
//! redelivers it, so retries survive a restart). After `max_attempts` failed
//! attempts it is dead-lettered (`<prefix>.dlq.webhook`, the reason naming the
//! endpoint, the last failure and the attempts). A receiver that keeps the
//! ids it processed (`corral-webhook-id`, `<run_id>:<version>`) processes
//! each transition once.
//!
//! Each request carries:
//!
//! - `corral-webhook-id`: `<run_id>:<version>`, the idempotency key, the same
//!   on every attempt;
//! - `corral-webhook-timestamp`: Unix seconds when this attempt was sent;
//! - `corral-webhook-signature`: `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`
//!   (check it with [`verify`], and refuse timestamps far from now);
//! - `corral-webhook-attempt`: 1 on the first attempt.
//!
//! The body is [`Delivery`]. The run's labels, provider and cost come from
//! the tracker when the transition is delivered (while it cannot answer, the
//! delivery waits; nothing is dropped).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use corral_client::Client;
use corral_common::Secret;
use corral_proto::Subjects;
use corral_proto::v1::{LifecycleEvent, Run, RunEvent, RunState, tracker_error::Code};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::config::Webhook;

/// The idempotency key: `<run_id>:<version>`.
pub const ID_HEADER: &str = "corral-webhook-id";
/// Unix seconds when the attempt was sent; part of the signed text.
pub const TIMESTAMP_HEADER: &str = "corral-webhook-timestamp";
/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "corral-webhook-signature";
/// The attempt's number, 1 first.
pub const ATTEMPT_HEADER: &str = "corral-webhook-attempt";
/// Dead letters of webhook deliveries: `<prefix>.dlq.webhook`.
pub const DLQ_KIND: &str = "webhook";
/// Shortest secret accepted, bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// How long a request in flight at shutdown may still take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The durable consumer of the endpoint `name` on the lifecycle stream.
pub fn consumer_name(name: &str) -> String {
    format!("corral-webhook-{name}")
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`: the value of
/// [`SIGNATURE_HEADER`].
pub fn signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Whether `signature_header` (one `v1=<hex>`, or several separated by
/// commas) holds the signature of `timestamp` and `body` with `secret`,
/// compared in constant time. It does not judge the timestamp: a receiver
/// should also refuse one far from its clock (say 5 minutes), so that a
/// recorded request cannot be replayed later.
pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature_header: &str) -> bool {
    signature_header
        .split(',')
        .filter_map(|one| one.trim().strip_prefix("v1="))
        .filter_map(|hex_text| hex::decode(hex_text).ok())
        .any(|given| mac(secret, timestamp, body).verify_slice(&given).is_ok())
}

fn mac(secret: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC should take a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The JSON body of a webhook request: one transition of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    /// `<run_id>:<version>`, as in [`ID_HEADER`].
    pub id: String,
    pub run_id: String,
    /// The run's version after the transition; orders a run's transitions.
    pub version: u64,
    /// The state before (`null` for the first transition, into `pending`).
    pub from: Option<String>,
    pub to: String,
    /// `submit`, `claim`, `start`, `complete`, `fail`, `stop`, ...
    pub event: String,
    pub reason: String,
    /// Who caused it: `spawner:<id>`, `tracker`, `reaper`, `cli:<user>`.
    pub actor: String,
    /// When the transition was committed, Unix ms.
    pub at_ms: i64,
    pub exit_code: Option<i32>,
    pub sandbox_id: String,
    /// The run's labels.
    pub labels: BTreeMap<String, String>,
    /// The run's provider (`null` when the tracker does not know the run).
    pub provider: Option<String>,
    /// The run's cost so far, when delivered (`null` as for `provider`).
    pub cost_usd: Option<f64>,
}

impl Delivery {
    /// The body for `event`, with what `run` (the tracker's record, `None`
    /// when it does not know the run) adds.
    pub fn new(event: &LifecycleEvent, run: Option<&Run>) -> Delivery {
        let from = event.from();
        let name = match event.event() {
            // Only the submit, into pending, has no state before it.
            RunEvent::Unspecified if from == RunState::Unspecified => "submit",
            other => other.name(),
        };
        Delivery {
            id: idempotency_key(event),
            run_id: event.run_id.clone(),
            version: event.version,
            from: (from != RunState::Unspecified).then(|| from.name().to_owned()),
            to: event.to().name().to_owned(),
            event: name.to_owned(),
            reason: event.reason.clone(),
            actor: event.actor.clone(),
            at_ms: event.at_ms,
            exit_code: event.exit_code,
            sandbox_id: event.sandbox_id.clone(),
            labels: run.map(labels_of).unwrap_or_default(),
            provider: run.map(|run| run.provider.clone()),
            cost_usd: run.map(|run| run.cost_usd),
        }
    }
}

/// `<run_id>:<version>`: the same id as the lifecycle message's `Nats-Msg-Id`.
pub fn idempotency_key(event: &LifecycleEvent) -> String {
    format!("{}:{}", event.run_id, event.version)
}

fn labels_of(run: &Run) -> BTreeMap<String, String> {
    run.spec
        .as_ref()
        .map(|spec| spec.labels.clone().into_iter().collect())
        .unwrap_or_default()
}

/// One configured endpoint, checked.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    url: reqwest::Url,
    secret: Secret,
    /// Empty: every state.
    states: Vec<RunState>,
    labels: BTreeMap<String, String>,
    max_attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    timeout: Duration,
    max_in_flight: usize,
}

/// The configured endpoints, checked; the error names the setting to change.
pub fn endpoints(config: &BTreeMap<String, Webhook>) -> Result<Vec<Endpoint>, String> {
    config
        .iter()
        .map(|(name, webhook)| Endpoint::parse(name, webhook))
        .collect()
}

impl Endpoint {
    pub fn parse(name: &str, webhook: &Webhook) -> Result<Endpoint, String> {
        let valid_name = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(format!(
                "webhooks: endpoint name {name:?} must be 1-64 of A-Z a-z 0-9 _ - (it names a NATS consumer)"
            ));
        }
        let setting = |key: &str| {
            format!(
                "webhooks.{name}.{key} (CORRAL_WEBHOOKS__{}__{})",
                name.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )
        };
        let url = reqwest::Url::parse(&webhook.url).map_err(|err| {
            format!(
                "{} {:?} is not a URL ({err}); give http(s)://host[:port]/path",
                setting("url"),
                webhook.url
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "{} {:?} must be an http:// or https:// URL with a host",
                setting("url"),
                webhook.url
            ));
        }
        let secret = webhook.secret.expose();
        if secret.is_empty() {
            return Err(format!(
                "{} is empty; set the key receivers check signatures with (e.g. `openssl rand -hex 32`)",
                setting("secret")
            ));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "{} is {} bytes; at least {MIN_SECRET_BYTES} are needed (e.g. `openssl rand -hex 32`)",
                setting("secret"),
                secret.len()
            ));
        }
        let states = webhook
            .states
            .iter()
            .map(|state| {
                RunState::from_name(state).ok_or_else(|| {
                    let known: Vec<&str> = RunState::ALL.iter().map(|s| s.name()).collect();
                    format!(
                        "{}: unknown state {state:?}; states are {}",
                        setting("states"),
                        known.join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if webhook.max_attempts == 0 {
            return Err(format!("{} must be at least 1", setting("max_attempts")));
        }
        if webhook.timeout_ms == 0 {
            return Err(format!("{} must be at least 1", setting("timeout_ms")));
        }
        if webhook.max_in_flight == 0 {
            return Err(format!("{} must be at least 1", setting("max_in_flight")));
        }
        if webhook.max_backoff_ms < webhook.backoff_ms {
            return Err(format!(
                "{} ({}) is below {} ({})",
                setting("max_backoff_ms"),
                webhook.max_backoff_ms,
                setting("backoff_ms"),
                webhook.backoff_ms
            ));
        }
        Ok(Endpoint {
            name: name.to_owned(),
            url,
            secret: webhook.secret.clone(),
            states,
            labels: webhook.labels.clone(),
            max_attempts: webhook.max_attempts,
            backoff: Duration::from_millis(webhook.backoff_ms),
            max_backoff: Duration::from_millis(webhook.max_backoff_ms),
            timeout: Duration::from_millis(webhook.timeout_ms),
            max_in_flight: webhook.max_in_flight as usize,
        })
    }

    /// Whether the endpoint wants transitions into `state`.
    pub fn wants_state(&self, state: RunState) -> bool {
        self.states.is_empty() || self.states.contains(&state)
    }

    /// Whether the endpoint wants a run with `labels` (every label of the
    /// filter, with its value).
    pub fn wants_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// The delay after failed attempt `attempt` (1 first): the base doubled
    /// per attempt, at most the cap.
    pub fn backoff(&self, attempt: i64) -> Duration {
        let doublings = attempt.saturating_sub(1).clamp(0, 30) as u32;
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }

    fn consumer_config(&self, subjects: &Subjects) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(consumer_name(&self.name)),
            description: Some(format!("corral lifecycle webhook {}", self.name)),
            filter_subject: subjects.lifecycle_all(),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            // Above one request; a delivery waiting for the tracker
            // reports progress.
            ack_wait: self.timeout + Duration::from_secs(30),
            // The attempts are counted here, and the last one dead-letters:
            // the server never drops a transition by itself.
            max_deliver: -1,
            max_ack_pending: self.max_in_flight as i64,
            ..Default::default()
        }
    }
}

/// What every delivery needs.
struct Shared {
    js: jetstream::Context,
    subjects: Subjects,
    tracker: Client,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

/// The endpoints with their consumers, ready to run.
pub struct Webhooks {
    endpoints: Vec<(Arc<Endpoint>, consumer::PullConsumer)>,
    shared: Arc<Shared>,
}

impl Webhooks {
    /// Creates (or updates) each endpoint's consumer, so that what is
    /// published from now on reaches it.
    pub async fn start(
        endpoints: Vec<Endpoint>,
        tracker: Client,
        subjects: Subjects,
        shutdown: CancellationToken,
    ) -> Result<Webhooks, Error> {
        let js = tracker.jetstream().clone();
        let http = reqwest::Client::builder()
            .user_agent(concat!("corral-webhook/", env!("CARGO_PKG_VERSION")))
            // A redirect is an answer that is not 2xx: the endpoint's URL
            // is to be fixed in the configuration.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| Error::Webhooks(format!("cannot build the HTTP client: {err}")))?;
        let mut started = Vec::with_capacity(endpoints.len());
        if !endpoints.is_empty() {
            let stream = js
                .get_stream(subjects.lifecycle_stream())
                .await
                .map_err(|e| Error::Nats(e.to_string()))?;
            for endpoint in endpoints {
                let config = endpoint.consumer_config(&subjects);
                let name = consumer_name(&endpoint.name);
                let consumer = match stream.create_consumer(config).await {
                    Ok(consumer) => consumer,
                    Err(err) => {
                        // A server that refuses to change an existing
                        // consumer: keep it as it is.
                        let existing = stream.get_consumer(&name).await.map_err(|e| {
                            Error::Nats(format!(
                                "cannot create webhook consumer {name} ({err}) nor read it ({e})"
                            ))
                        })?;
                        tracing::warn!(consumer = %name, error = %err, "webhook consumer not updated; using it as it is");
                        existing
                    }
                };
                tracing::info!(endpoint = %endpoint.name, consumer = %name, "webhook endpoint ready");
                started.push((Arc::new(endpoint), consumer));
            }
        }
        Ok(Webhooks {
            endpoints: started,
            shared: Arc::new(Shared {
                js,
                subjects,
                tracker,
                http,
                shutdown,
            }),
        })
    }

    /// Delivers to every endpoint until shutdown, then gives the requests
    /// in flight a moment to finish (what does not is redelivered).
    pub async fn run(self) -> Result<(), Error> {
        let shared = self.shared;
        futures::future::join_all(
            self.endpoints
                .into_iter()
                .map(|(endpoint, consumer)| serve(endpoint, consumer, shared.clone())),
        )
        .await;
        Ok(())
    }
}

/// One endpoint's loop: pulls as many transitions as it has room for and
/// delivers each in a task of its own.
async fn serve(endpoint: Arc<Endpoint>, consumer: consumer::PullConsumer, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(endpoint.max_in_flight));
    let shutdown = shared.shutdown.clone();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit,
        };
        let Ok(first) = first else { break };
        let room = 1 + slots.available_permits();
        let fetched = tokio::select! {
            _ = shutdown.cancelled() => break,
            fetched = consumer
                .fetch()
                .max_messages(room)
                .expires(Duration::from_secs(1))
                .messages() => fetched,
        };
        let mut batch = match fetched {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(endpoint = %endpoint.name, error = %err, "webhook fetch failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let mut first = Some(first);
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(endpoint = %endpoint.name, error = %err, "webhook delivery error");
                    continue;
                }
            };
            let permit = match first.take() {
                Some(permit) => permit,
                None => match slots.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (endpoint, shared) = (endpoint.clone(), shared.clone());
            tokio::spawn(async move {
                deliver(&endpoint, &shared, message).await;
                drop(permit);
            });
        }
    }
    // The deliveries in hand finish, or give up after the grace.
    let all = endpoint.max_in_flight as u32;
    let grace = SHUTDOWN_GRACE + Duration::from_secs(3);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(endpoint = %endpoint.name, "webhook deliveries still settling at shutdown; they will be redelivered");
    }
}

fn count(endpoint: &Endpoint, outcome: &'static str) {
    metrics::counter!(
        "corral_webhook_deliveries_total",
        "endpoint" => endpoint.name.clone(),
        "outcome" => outcome
    )
    .increment(1);
}

/// One attempt at one transition: acked when the endpoint took it or does
/// not want it, nakked with the backoff when it failed, dead-lettered at
/// the last attempt.
async fn deliver(endpoint: &Endpoint, shared: &Shared, message: jetstream::Message) {
    let attempt = message.info().map(|i| i.delivered).unwrap_or(1).max(1);
    let event = match LifecycleEvent::decode(message.payload.clone()) {
        Ok(event) => event,
        Err(err) => {
            let reason = format!(
                "webhook {}: payload did not decode as LifecycleEvent: {err}",
                endpoint.name
            );
            dead_letter(endpoint, shared, &message, &reason, attempt).await;
            return;
        }
    };
    if !endpoint.wants_state(event.to()) {
        ack(endpoint, &message).await;
        count(endpoint, "filtered");
        return;
    }
    let run = match lookup(shared, &event.run_id, &message).await {
        Lookup::Found(run) => Some(run),
        Lookup::Unknown => None,
        Lookup::ShuttingDown => {
            // Another instance (or the next start) takes it at once.
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        }
    };
    let body = Delivery::new(&event, run.as_deref());
    if !endpoint.wants_labels(&body.labels) {
        ack(endpoint, &message).await;
        count(endpoint, "filtered");
        return;
    }
    // At shutdown a request gets a moment to finish; then it is given up
    // and the transition redelivered (at once, to whoever runs).
    let cut = async {
        shared.shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let sent = tokio::select! {
        sent = send(endpoint, shared, &body, attempt) => sent,
        _ = cut => {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        }
    };
    match sent {
        Ok(()) => {
            ack(endpoint, &message).await;
            count(endpoint, "delivered");
        }
        Err(why) if attempt >= i64::from(endpoint.max_attempts) => {
            let reason = format!(
                "webhook {}: gave up after {attempt} attempts: {why}",
                endpoint.name
            );
            dead_letter(endpoint, shared, &message, &reason, attempt).await;
        }
        Err(why) => {
            let delay = endpoint.backoff(attempt);
            if attempt == 1 {
                tracing::warn!(endpoint = %endpoint.name, id = %body.id, attempt, retry_in = ?delay, error = %why, "webhook delivery failed; will retry");
            } else {
                tracing::debug!(endpoint = %endpoint.name, id = %body.id, attempt, retry_in = ?delay, error = %why, "webhook delivery failed again; will retry");
            }
            if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(endpoint = %endpoint.name, error = %err, "webhook nak failed; redelivered after ack_wait");
            }
            count(endpoint, "retried");
        }
    }
}

async fn ack(endpoint: &Endpoint, message: &jetstream::Message) {
    if let Err(err) = message.ack().await {
        // Redelivered, and taken again by a receiver that keeps ids.
        tracing::warn!(endpoint = %endpoint.name, error = %err, "webhook ack failed; the transition will be delivered again");
    }
}

async fn dead_letter(
    endpoint: &Endpoint,
    shared: &Shared,
    message: &jetstream::Message,
    reason: &str,
    attempt: i64,
) {
    tracing::warn!(endpoint = %endpoint.name, subject = %message.subject, reason, "dead-lettering webhook delivery");
    match corral_common::nats::dead_letter(&shared.js, &shared.subjects, DLQ_KIND, message, reason)
        .await
    {
        Ok(()) => count(endpoint, "dead_lettered"),
        Err(err) => {
            tracing::error!(endpoint = %endpoint.name, error = %err, "dead-letter publish failed; the transition will be redelivered");
            let _ = message
                .ack_with(AckKind::Nak(Some(endpoint.backoff(attempt))))
                .await;
        }
    }
}

enum Lookup {
    Found(Box<Run>),
    /// The tracker says there is no such run.
    Unknown,
    ShuttingDown,
}

/// The run, from the tracker. While the tracker cannot answer, waits with
/// backoff, telling the stream the message is in progress, so that the
/// endpoint's attempts count only its own failures.
async fn lookup(shared: &Shared, run_id: &str, message: &jetstream::Message) -> Lookup {
    let mut failures: u32 = 0;
    loop {
        match shared.tracker.get(run_id).await {
            Ok(run) => return Lookup::Found(Box::new(run)),
            Err(err) if err.code() == Some(Code::NotFound) => {
                tracing::warn!(
                    run_id,
                    "webhook: the tracker does not know the run; delivering without labels, provider and cost"
                );
                return Lookup::Unknown;
            }
            Err(err) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(run_id, error = %err, "webhook: the tracker cannot answer; waiting for it");
                }
                let _ = message.ack_with(AckKind::Progress).await;
                let delay =
                    Duration::from_millis(200 << failures.min(5)).min(Duration::from_secs(5));
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return Lookup::ShuttingDown,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// POSTs `body`, signed; `Err` says why the attempt failed.
async fn send(
    endpoint: &Endpoint,
    shared: &Shared,
    body: &Delivery,
    attempt: i64,
) -> Result<(), String> {
    let body_bytes = serde_json::to_vec(body).map_err(|err| format!("cannot encode: {err}"))?;
    let timestamp = (corral_common::now_ms() / 1000).to_string();
    let signed = signature(endpoint.secret.expose(), &timestamp, &body_bytes);
    let sent = shared
        .http
        .post(endpoint.url.clone())
        .timeout(endpoint.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(ID_HEADER, &body.id)
        .header(TIMESTAMP_HEADER, &timestamp)
        .header(SIGNATURE_HEADER, signed)
        .header(ATTEMPT_HEADER, attempt.to_string())
        .body(body_bytes)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("answered {}", response.status())),
        Err(err) if err.is_timeout() => Err(format!(
            "no answer within {} ms",
            endpoint.timeout.as_millis()
        )),
        // Without the URL: it may hold credentials.
        Err(err) => Err(describe(&err.without_url())),
    }
}

/// An error with its causes: `a: b: c`.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use corral_proto::v1::RunSpec;

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn webhook(url: &str) -> Webhook {
        Webhook {
            url: url.into(),
            secret: Secret::new(SECRET),
            ..Default::default()
        }
    }

    #[test]
    fn a_signature_verifies_only_for_its_secret_timestamp_and_body() {
        let body = br#"{"id":"r1:3"}"#;
        let signed = signature(SECRET, "1700000000", body);
        assert!(signed.starts_with("v1="), "{signed}");
        assert_eq!(signed.len(), 3 + 64);
        assert!(verify(SECRET, "1700000000", body, &signed));
        assert!(!verify(
            "another secret of enough bytes",
            "1700000000",
            body,
            &signed
        ));
        assert!(!verify(SECRET, "1700000001", body, &signed));
        assert!(!verify(SECRET, "1700000000", br#"{"id":"r1:4"}"#, &signed));
        assert!(!verify(
            SECRET,
            "1700000000",
            body,
            &signed.replace("v1=", "v0=")
        ));
        assert!(!verify(SECRET, "1700000000", body, "v1=zz"));
        assert!(!verify(SECRET, "1700000000", body, ""));
        // Several signatures (a receiver's rotation): any one may match.
        let old = signature("the key before this one, long", "1700000000", body);
        assert!(verify(
            SECRET,
            "1700000000",
            body,
            &format!("{old}, {signed}")
        ));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        // As a receiver in any language computes it (this value from
        // Python's `hmac.new(b"key of sixteen!!", b"42.{}", hashlib.sha256)`).
        assert_eq!(
            signature("key of sixteen!!", "42", b"{}"),
            "v1=c5f180b0848dd9ee62f9aa6a184cc3720cd01408eb54b40162cf066d5ffa3b6a"
        );
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let endpoint = Endpoint::parse(
            "e",
            &Webhook {
                backoff_ms: 1000,
                max_backoff_ms: 60_000,
                ..webhook("http://127.0.0.1:9/hook")
            },
        )
        .expect("valid");
        let secs: Vec<u64> = (1..=9).map(|a| endpoint.backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(endpoint.backoff(0), Duration::from_secs(1));
        assert_eq!(endpoint.backoff(i64::MAX), Duration::from_secs(60));
    }

    #[test]
    fn bad_settings_are_refused_naming_the_setting() {
        let cases = [
            (
                webhook("not a url"),
                "webhooks.billing.url (CORRAL_WEBHOOKS__BILLING__URL)",
            ),
            (
                webhook("ftp://example.com/x"),
                "must be an http:// or https:// URL",
            ),
            (
                Webhook {
                    secret: Secret::default(),
                    ..webhook("http://example.com/x")
                },
                "webhooks.billing.secret (CORRAL_WEBHOOKS__BILLING__SECRET) is empty",
            ),
            (
                Webhook {
                    secret: Secret::new("short"),
                    ..webhook("http://example.com/x")
                },
                "is 5 bytes; at least 16",
            ),
            (
                Webhook {
                    states: vec!["running".into(), "done".into()],
                    ..webhook("http://example.com/x")
                },
                "webhooks.billing.states (CORRAL_WEBHOOKS__BILLING__STATES): unknown state \"done\"; states are pending, booting, running",
            ),
            (
                Webhook {
                    max_attempts: 0,
                    ..webhook("http://example.com/x")
                },
                "webhooks.billing.max_attempts",
            ),
            (
                Webhook {
                    max_backoff_ms: 10,
                    ..webhook("http://example.com/x")
                },
                "max_backoff_ms (CORRAL_WEBHOOKS__BILLING__MAX_BACKOFF_MS) (10) is below",
            ),
        ];
        for (config, expected) in cases {
            let err = Endpoint::parse("billing", &config).expect_err("refused");
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
            assert!(!err.contains(SECRET), "{err}");
        }
        let err = Endpoint::parse("a.b", &webhook("http://example.com/x")).expect_err("refused");
        assert!(err.contains("endpoint name \"a.b\""), "{err}");
    }

    #[test]
    fn endpoints_come_from_the_environment_by_name() {
        let env: HashMap<String, String> = [
            (
                "CORRAL_WEBHOOKS__BILLING__URL",
                "https://billing.example.com/corral",
            ),
            ("CORRAL_WEBHOOKS__BILLING__SECRET", SECRET),
            ("CORRAL_WEBHOOKS__BILLING__STATES", "[completed, failed]"),
            ("CORRAL_WEBHOOKS__BILLING__LABELS__TEAM", "infra"),
            ("CORRAL_WEBHOOKS__BILLING__MAX_ATTEMPTS", "3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let config = crate::config::Flags::default().load(&env).expect("loads");
        let billing = &config.webhooks["billing"];
        assert_eq!(billing.url, "https://billing.example.com/corral");
        assert_eq!(billing.secret.expose(), SECRET);
        assert_eq!(billing.states, ["completed", "failed"]);
        assert_eq!(billing.labels["team"], "infra");
        assert_eq!(billing.max_attempts, 3);
        assert_eq!(billing.timeout_ms, 10_000, "the rest default");
        let parsed = endpoints(&config.webhooks).expect("valid");
        assert_eq!(parsed[0].states, [RunState::Completed, RunState::Failed]);
        assert!(
            !format!("{config:?}").contains(SECRET),
            "the secret never prints"
        );
    }

    #[test]
    fn filters_want_their_states_and_every_label() {
        let endpoint = Endpoint::parse(
            "e",
            &Webhook {
                states: vec!["completed".into(), "failed".into()],
                labels: [("team".into(), "infra".into())].into(),
                ..webhook("http://127.0.0.1:9/")
            },
        )
        .expect("valid");
        assert!(endpoint.wants_state(RunState::Completed));
        assert!(!endpoint.wants_state(RunState::Running));
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(endpoint.wants_labels(&labels(&[("team", "infra"), ("x", "y")])));
        assert!(!endpoint.wants_labels(&labels(&[("team", "web")])));
        assert!(!endpoint.wants_labels(&labels(&[])));
        let all = Endpoint::parse("all", &webhook("http://127.0.0.1:9/")).expect("valid");
        assert!(all.wants_state(RunState::Pending) && all.wants_labels(&labels(&[])));
    }

    #[test]
    fn the_body_names_states_and_events_and_carries_the_run() {
        let submit = LifecycleEvent {
            run_id: "r1".into(),
            from: RunState::Unspecified as i32,
            to: RunState::Pending as i32,
            event: RunEvent::Unspecified as i32,
            actor: "cli:ann".into(),
            at_ms: 1_700_000_000_000,
            version: 1,
            ..Default::default()
        };
        let body = Delivery::new(&submit, None);
        assert_eq!(body.id, "r1:1");
        assert_eq!(body.from, None);
        assert_eq!(body.to, "pending");
        assert_eq!(body.event, "submit");
        assert_eq!((body.provider, body.cost_usd), (None, None));

        let failed = LifecycleEvent {
            from: RunState::Running as i32,
            to: RunState::Failed as i32,
            event: RunEvent::Fail as i32,
            reason: "exit 3".into(),
            version: 4,
            exit_code: Some(3),
            sandbox_id: "sb-1".into(),
            ..submit
        };
        let run = Run {
            run_id: "r1".into(),
            provider: "local".into(),
            cost_usd: 0.25,
            spec: Some(RunSpec {
                labels: [("team".to_owned(), "infra".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let body = Delivery::new(&failed, Some(&run));
        let json = serde_json::to_value(&body).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "id": "r1:4", "run_id": "r1", "version": 4, "from": "running",
                "to": "failed", "event": "fail", "reason": "exit 3", "actor": "cli:ann",
                "at_ms": 1_700_000_000_000i64, "exit_code": 3, "sandbox_id": "sb-1",
                "labels": {"team": "infra"}, "provider": "local", "cost_usd": 0.25,
            })
        );
    }
}
