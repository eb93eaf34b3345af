//! GenAI traces: every run that ends is exported once, as one OpenTelemetry
//! trace that follows the GenAI semantic conventions v1.37.0, to an
//! OTLP/HTTP traces endpoint (`genai_traces`, e.g.
//! `http://collector:4318/v1/traces`).
//!
//! The durable consumer `corral-genai` reads the lifecycle stream; a
//! terminal transition makes it wait until the run's events are settled
//! (the persister's ack floor has reached the events stream's last
//! sequence as it was when the transition was handled), read the run (the
//! tracker), its history (`run_transitions`) and its events
//! (`sandbox_events`), and post the trace built by [`build`]. It acks only
//! after the collector accepted the trace; a collector that is away or
//! answers 429/502/503/504 gets the trace again later (nak with a backoff
//! up to a minute, for as long as the lifecycle stream keeps the message);
//! a message that does not decode, a run the tracker does not know and a
//! trace the collector refuses for good are dead-lettered (`<prefix>.dlq.genai`).
//!
//! Every id is derived from the run id ([`trace_id`], span ids from the
//! events' ids), so a trace exported again after a crash between the
//! collector's answer and the ack has the same ids as the first. What an
//! agent posts after its run ended is not in the trace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use corral_client::Client;
use corral_proto::Subjects;
use corral_proto::v1::{LifecycleEvent, Run, RunState};
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value as Any,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::Event, span::SpanKind, status::StatusCode,
};
use prost::Message;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::persister::Watermark;
use crate::store::{self, StoredEvent, Transition};

/// The durable consumer on the lifecycle stream.
pub const CONSUMER: &str = "corral-genai";
/// The semantic conventions the traces follow.
pub const SEMCONV_VERSION: &str = "1.37.0";
const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.37.0";
/// Events of one run a trace reads at most (the rest is left out and the
/// root says `corral.trace.truncated`).
const MAX_EVENTS: i64 = 10_000;
/// How long a terminal transition waits for the run's events to settle
/// before it is handed back for later.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
/// Traces exported at once.
const IN_FLIGHT: usize = 4;
/// The kinds a trace is built from (never `agent.output`: lines are not spans).
const KINDS: [&str; 10] = [
    "agent.started",
    "agent.completed",
    "agent.tool_use",
    "agent.tool_completed",
    "agent.file_edited",
    "agent.error",
    "agent.system_message",
    "agent.assistant_message",
    "agent.message",
    "agent.user_tool_result",
];

/// What the consumer needs; cloned into each handling.
#[derive(Clone)]
struct Exporter {
    js: jetstream::Context,
    subjects: Subjects,
    pool: PgPool,
    client: Client,
    /// Up to where events are stored (shared with page reads).
    watermark: Arc<Watermark>,
    http: reqwest::Client,
    url: reqwest::Url,
    /// Cuts a wait for settling short (the persister stops too).
    shutdown: CancellationToken,
}

/// What became of one lifecycle message.
#[derive(Debug)]
enum Outcome {
    /// Exported, or nothing to export: ack.
    Done,
    /// Worth trying again later: nak with a backoff.
    Retry(String),
    /// Retrying cannot help: dead-letter with the reason.
    Poison(String),
}

/// Checks `url` as `genai_traces` must be: an http(s) URL.
pub fn parse_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|err| {
        format!("{url:?} is not a URL ({err}); e.g. http://collector:4318/v1/traces")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{url:?} is not http(s); e.g. http://collector:4318/v1/traces"
        ));
    }
    Ok(parsed)
}

/// The export, its consumer created: what ends from now on is exported.
pub struct GenaiTraces {
    consumer: consumer::Consumer<consumer::pull::Config>,
    exporter: Exporter,
}

impl GenaiTraces {
    /// Creates the durable consumer (when missing) for exports to `url`;
    /// fails when `url` is not an http(s) URL or NATS refuses.
    pub async fn start(
        js: jetstream::Context,
        subjects: Subjects,
        pool: PgPool,
        client: Client,
        watermark: Arc<Watermark>,
        url: &str,
    ) -> Result<GenaiTraces, Error> {
        let url = parse_url(url).map_err(Error::GenaiTraces)?;
        let consumer = corral_common::streams::pull_consumer_patiently(
            &js,
            &subjects.lifecycle_stream(),
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subject: subjects.lifecycle_all(),
                ack_policy: consumer::AckPolicy::Explicit,
                // Runs that end from now on; the past is not replayed.
                deliver_policy: consumer::DeliverPolicy::New,
                // Settling, reading and posting take at most ~25 s.
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 256,
                ..Default::default()
            },
        )
        .await
        .map_err(Error::Nats)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::GenaiTraces(e.to_string()))?;
        Ok(GenaiTraces {
            consumer,
            exporter: Exporter {
                js,
                subjects,
                pool,
                client,
                watermark,
                http,
                url,
                shutdown: CancellationToken::new(),
            },
        })
    }

    /// Exports the trace of every run that ends until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let GenaiTraces { consumer, exporter } = self;
        let exporter = Exporter {
            shutdown: shutdown.clone(),
            ..exporter
        };
        tracing::info!(url = %exporter.url, semconv = SEMCONV_VERSION, "genai trace export started");
        loop {
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                fetched = consumer
                    .fetch()
                    .max_messages(IN_FLIGHT * 4)
                    .expires(Duration::from_millis(500))
                    .messages() => fetched,
            };
            let messages = match fetched {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, "lifecycle fetch failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // The batch in hand is finished even during shutdown: its acks
            // follow its exports.
            messages
                .for_each_concurrent(IN_FLIGHT, |message| {
                    let exporter = exporter.clone();
                    async move {
                        match message {
                            Ok(message) => exporter.settle(message).await,
                            Err(err) => tracing::warn!(error = %err, "lifecycle delivery error"),
                        }
                    }
                })
                .await;
        }
    }
}

impl Exporter {
    /// Handles one message and acks, naks or dead-letters it.
    async fn settle(&self, message: jetstream::Message) {
        let outcome = self.handle(&message).await;
        match outcome {
            Outcome::Done => {
                if let Err(err) = message.ack().await {
                    tracing::warn!(error = %err, "lifecycle ack failed; the trace may be exported again");
                }
            }
            Outcome::Retry(reason) => {
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                let delay = backoff(delivered);
                if self.shutdown.is_cancelled() {
                    tracing::debug!(subject = %message.subject, reason, "genai trace left for after the restart");
                } else {
                    tracing::warn!(subject = %message.subject, reason, delivered, retry_in = ?delay, "genai trace not exported, will retry");
                    metrics::counter!("corral_genai_trace_retries_total").increment(1);
                }
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Outcome::Poison(reason) => {
                tracing::warn!(subject = %message.subject, reason, "dead-lettering lifecycle event for genai traces");
                if let Err(err) = corral_common::nats::dead_letter(
                    &self.js,
                    &self.subjects,
                    "genai",
                    &message,
                    &reason,
                )
                .await
                {
                    tracing::error!(error = %err, "dead-letter publish failed; the message will be redelivered");
                }
            }
        }
    }

    async fn handle(&self, message: &jetstream::Message) -> Outcome {
        let event = match LifecycleEvent::decode(message.payload.clone()) {
            Ok(event) => event,
            Err(err) => {
                return Outcome::Poison(format!("payload did not decode as LifecycleEvent: {err}"));
            }
        };
        if !event.to().is_terminal() {
            return Outcome::Done;
        }
        if let Err(reason) = self.wait_settled().await {
            return Outcome::Retry(reason);
        }
        let run = match self.client.get(&event.run_id).await {
            Ok(run) => run,
            Err(err) if err.is_transient() => {
                return Outcome::Retry(format!("tracker: {err}"));
            }
            Err(err) => {
                return Outcome::Poison(format!("run {:?} could not be read: {err}", event.run_id));
            }
        };
        if !run.state().is_terminal() {
            return Outcome::Retry(format!(
                "the tracker shows run {} {}, not ended",
                run.run_id,
                run.state().name()
            ));
        }
        // Reads only: whatever the database says, the data is not at fault.
        let transitions = match store::transitions(&self.pool, &run.run_id).await {
            Ok(transitions) => transitions,
            Err(err) => return Outcome::Retry(format!("database: {err}")),
        };
        let events = match store::events_of_kinds(&self.pool, &run.run_id, &KINDS, MAX_EVENTS).await
        {
            Ok(events) => events,
            Err(err) => return Outcome::Retry(format!("database: {err}")),
        };
        let truncated = events.len() as i64 >= MAX_EVENTS;
        let request = build(
            &run,
            &transitions,
            &events,
            self.subjects.prefix(),
            truncated,
        );
        let spans = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum::<usize>();
        let outcome = self.post(&request).await;
        if matches!(outcome, Outcome::Done) {
            metrics::counter!("corral_genai_traces_exported_total").increment(1);
            tracing::debug!(run_id = %run.run_id, spans, "genai trace exported");
        }
        outcome
    }

    /// Waits until every event published before now is stored (or
    /// dead-lettered): the persister's ack floor reaches the events
    /// stream's last sequence as it is now. Agents' events of a run that
    /// ended were published before its end, so they are all stored then.
    async fn wait_settled(&self) -> Result<(), String> {
        let target = self
            .js
            .get_stream(self.subjects.events_stream())
            .await
            .map_err(|err| format!("events stream: {err}"))?
            .cached_info()
            .state
            .last_sequence;
        let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
        loop {
            let floor = self.watermark.get().await?;
            if floor >= target as i64 {
                return Ok(());
            }
            if self.shutdown.is_cancelled() {
                return Err("shutting down".into());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "events not settled within {SETTLE_LIMIT:?} (stored up to {floor} of {target})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Posts the trace; retryable answers are those OTLP/HTTP names
    /// (429, 502, 503, 504) and failures to reach the collector.
    async fn post(&self, request: &ExportTraceServiceRequest) -> Outcome {
        let response = match self
            .http
            .post(self.url.clone())
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
        {
            Ok(response) => response,
            Err(err) => return Outcome::Retry(format!("collector unreachable: {err}")),
        };
        let status = response.status();
        if status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            if let Ok(answer) = ExportTraceServiceResponse::decode(body)
                && let Some(partial) = answer.partial_success
                && partial.rejected_spans > 0
            {
                // Partial success is final: sending again would not help.
                tracing::warn!(rejected = partial.rejected_spans, error = %partial.error_message, "collector rejected some genai spans");
            }
            return Outcome::Done;
        }
        let text = response.text().await.unwrap_or_default();
        let answer = format!("collector answered {status}: {}", text.trim());
        match status.as_u16() {
            429 | 502 | 503 | 504 => Outcome::Retry(answer),
            _ => Outcome::Poison(answer),
        }
    }
}

/// The delay before delivery `delivered + 1`: 1 s, doubling, at most 60 s.
fn backoff(delivered: i64) -> Duration {
    let exponent = delivered.clamp(1, 7) - 1;
    Duration::from_secs((1u64 << exponent).min(60))
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.finalize().into()
}

/// The trace id of a run: the first 16 bytes of SHA-256 of its id (never
/// all zero, which OTLP reserves).
pub fn trace_id(run_id: &str) -> Vec<u8> {
    let mut id = digest(&["corral.trace", run_id])[..16].to_vec();
    if id.iter().all(|b| *b == 0) {
        id[15] = 1;
    }
    id
}

/// A span id of a run: the first 8 bytes of SHA-256 of the run id and `what`.
fn span_id(run_id: &str, what: &str) -> Vec<u8> {
    let mut id = digest(&["corral.span", run_id, what])[..8].to_vec();
    if id.iter().all(|b| *b == 0) {
        id[7] = 1;
    }
    id
}

fn nanos(ms: i64) -> u64 {
    (ms.max(0) as u64).saturating_mul(1_000_000)
}

fn attribute(key: &str, value: Any) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    attribute(key, Any::StringValue(value.into()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attribute(key, Any::IntValue(value))
}

fn double(key: &str, value: f64) -> KeyValue {
    attribute(key, Any::DoubleValue(value))
}

fn boolean(key: &str, value: bool) -> KeyValue {
    attribute(key, Any::BoolValue(value))
}

fn error_status(message: impl Into<String>) -> Option<Status> {
    Some(Status {
        code: StatusCode::Error as i32,
        message: message.into(),
    })
}

/// The GenAI provider (`gen_ai.provider.name`) a model name says, as best
/// known: only well-known prefixes of well-known providers.
pub fn provider_of_model(model: &str) -> Option<&'static str> {
    let model = model.to_ascii_lowercase();
    // A routed name such as `anthropic/claude-...` or `openai/gpt-...`.
    let name = model.rsplit('/').next().unwrap_or(&model);
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
    if starts(&["claude"]) {
        Some("anthropic")
    } else if starts(&["gpt-", "chatgpt", "o1", "o3", "o4", "codex"]) {
        Some("openai")
    } else if starts(&["gemini"]) {
        Some("gcp.gen_ai")
    } else if starts(&["mistral", "codestral", "devstral", "magistral"]) {
        Some("mistral_ai")
    } else if starts(&["deepseek"]) {
        Some("deepseek")
    } else if starts(&["grok"]) {
        Some("x_ai")
    } else {
        None
    }
}

fn text<'a>(data: &'a Value, key: &str) -> &'a str {
    data.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn number(data: &Value, key: &str) -> Option<i64> {
    data.get(key).and_then(Value::as_i64)
}

/// The trace of an ended `run`: its history, its agent's `events` (oldest
/// first) and the deployment's subject `prefix`; `truncated` when events
/// were left out. Pure: the same input gives the same trace, ids included.
pub fn build(
    run: &Run,
    transitions: &[Transition],
    events: &[StoredEvent],
    prefix: &str,
    truncated: bool,
) -> ExportTraceServiceRequest {
    let run_id = run.run_id.as_str();
    let trace = trace_id(run_id);
    let root_id = span_id(run_id, "root");
    let labels = run.spec.as_ref().map(|s| &s.labels);
    let label = |key: &str| {
        labels
            .and_then(|l| l.get(key))
            .filter(|v| !v.is_empty())
            .cloned()
    };

    // The run's window; every child lies within it.
    let first_transition = transitions.first().map(|t| t.at_ms).unwrap_or(0);
    let last_transition = transitions.last().map(|t| t.at_ms).unwrap_or(0);
    let start = [run.created_at_ms, first_transition]
        .into_iter()
        .find(|ms| *ms > 0)
        .unwrap_or_else(|| events.first().map(|e| e.at_ms).unwrap_or(0));
    let end = [run.finished_at_ms, last_transition, run.updated_at_ms]
        .into_iter()
        .find(|ms| *ms > 0)
        .unwrap_or(start)
        .max(start);
    let clamp = |ms: i64| ms.clamp(start, end);

    let mut children: Vec<Span> = Vec::new();
    let mut root_events: Vec<Event> = Vec::new();
    // Tool calls not completed yet: (tool_use_id, index in `children`).
    let mut open: Vec<(String, usize)> = Vec::new();
    let mut chats: Vec<usize> = Vec::new();
    let mut request_model = String::new();
    let mut session = run.session_id.clone();
    let mut reported_session = String::new();
    let mut usage: Option<(i64, i64)> = None;
    let mut previous = run.running_at_ms.max(start);
    let provider_label = label("gen_ai.provider.name");

    for event in events {
        let at = clamp(event.at_ms);
        let data = &event.data;
        match event.kind.as_str() {
            "agent.started" => {
                if request_model.is_empty() {
                    request_model = text(data, "model").to_owned();
                }
                if !text(data, "session_id").is_empty() {
                    reported_session = text(data, "session_id").to_owned();
                }
            }
            "agent.completed" => {
                if !text(data, "session_id").is_empty() {
                    reported_session = text(data, "session_id").to_owned();
                }
            }
            "agent.tool_use" => {
                let tool = text(data, "tool");
                let call = text(data, "tool_use_id");
                let mut attributes = vec![
                    string("gen_ai.operation.name", "execute_tool"),
                    string("gen_ai.tool.name", tool),
                ];
                if !call.is_empty() {
                    attributes.push(string("gen_ai.tool.call.id", call));
                }
                open.push((call.to_owned(), children.len()));
                children.push(Span {
                    trace_id: trace.clone(),
                    span_id: span_id(run_id, &format!("tool:{}", event.event_id)),
                    parent_span_id: root_id.clone(),
                    name: format!("execute_tool {tool}"),
                    kind: SpanKind::Internal as i32,
                    start_time_unix_nano: nanos(at),
                    end_time_unix_nano: nanos(at),
                    attributes,
                    ..Default::default()
                });
            }
            "agent.tool_completed" => {
                let call = text(data, "tool_use_id");
                // By id; completions without one close the oldest call without one.
                let found = if call.is_empty() {
                    open.iter().position(|(id, _)| id.is_empty())
                } else {
                    open.iter().rposition(|(id, _)| id == call)
                };
                if let Some(position) = found {
                    let (_, index) = open.remove(position);
                    let span = &mut children[index];
                    span.end_time_unix_nano = nanos(at).max(span.start_time_unix_nano);
                    if data.get("is_error").and_then(Value::as_bool) == Some(true) {
                        span.attributes.push(string("error.type", "tool_error"));
                        span.status = error_status("the tool reported an error");
                    }
                }
            }
            "agent.file_edited" => {
                let mut attributes = vec![string("corral.file.path", text(data, "path"))];
                attributes.push(int(
                    "corral.file.diff_bytes",
                    text(data, "unified_diff").len() as i64,
                ));
                if let Some(turn) = number(data, "turn").filter(|t| *t > 0) {
                    attributes.push(int("corral.file.turn", turn));
                }
                let edit = Event {
                    time_unix_nano: nanos(at),
                    name: "corral.file_edited".into(),
                    attributes,
                    ..Default::default()
                };
                // On the tool call in progress (the edit is its doing), else the run.
                match open.last() {
                    Some((_, index)) => children[*index].events.push(edit),
                    None => root_events.push(edit),
                }
            }
            "agent.error" => root_events.push(Event {
                time_unix_nano: nanos(at),
                name: "exception".into(),
                attributes: vec![
                    string("exception.type", "agent.error"),
                    string("exception.message", text(data, "message")),
                ],
                ..Default::default()
            }),
            _ => {
                let model = text(data, "model");
                if !model.is_empty() {
                    // The model call ran from the agent's previous step to
                    // the message (or from the latest transition: a turn).
                    let since = transitions
                        .iter()
                        .map(|t| t.at_ms)
                        .filter(|ms| *ms <= event.at_ms)
                        .max()
                        .unwrap_or(0)
                        .max(previous);
                    let mut attributes = vec![
                        string("gen_ai.operation.name", "chat"),
                        string("gen_ai.request.model", model),
                        string("gen_ai.response.model", model),
                    ];
                    if let Some(provider) = provider_label
                        .clone()
                        .or_else(|| provider_of_model(model).map(str::to_owned))
                    {
                        attributes.insert(1, string("gen_ai.provider.name", provider));
                    }
                    if let Some(reported) = data.get("usage") {
                        let input = number(reported, "input_tokens").unwrap_or(0);
                        let output = number(reported, "output_tokens").unwrap_or(0);
                        attributes.push(int("gen_ai.usage.input_tokens", input));
                        attributes.push(int("gen_ai.usage.output_tokens", output));
                        let (sum_in, sum_out) = usage.unwrap_or((0, 0));
                        usage = Some((sum_in + input, sum_out + output));
                    }
                    if request_model.is_empty() {
                        request_model = model.to_owned();
                    }
                    chats.push(children.len());
                    children.push(Span {
                        trace_id: trace.clone(),
                        span_id: span_id(run_id, &format!("chat:{}", event.event_id)),
                        parent_span_id: root_id.clone(),
                        name: format!("chat {model}"),
                        kind: SpanKind::Client as i32,
                        start_time_unix_nano: nanos(clamp(since).min(at)),
                        end_time_unix_nano: nanos(at),
                        attributes,
                        ..Default::default()
                    });
                }
            }
        }
        previous = previous.max(at);
    }
    for (_, index) in open {
        let span = &mut children[index];
        span.end_time_unix_nano = nanos(end).max(span.start_time_unix_nano);
        span.attributes
            .push(string("error.type", "tool_incomplete"));
        span.status = error_status("the agent never reported this tool call completed");
    }
    if session.is_empty() {
        session = reported_session;
    }
    if !session.is_empty() {
        for index in &chats {
            children[*index]
                .attributes
                .push(string("gen_ai.conversation.id", session.clone()));
        }
    }

    // The root: the agent's invocation, with corral's own record.
    let argv0 = run
        .spec
        .as_ref()
        .and_then(|s| s.argv.first())
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
        .unwrap_or_default();
    let agent_name = label("gen_ai.agent.name").unwrap_or(argv0);
    let provider = provider_label.or_else(|| provider_of_model(&request_model).map(str::to_owned));
    let mut attributes = vec![string("gen_ai.operation.name", "invoke_agent")];
    if let Some(provider) = provider {
        attributes.push(string("gen_ai.provider.name", provider));
    }
    attributes.push(string(
        "gen_ai.agent.id",
        label("gen_ai.agent.id").unwrap_or_else(|| run_id.to_owned()),
    ));
    if !agent_name.is_empty() {
        attributes.push(string("gen_ai.agent.name", agent_name.clone()));
    }
    if let Some(description) = label("gen_ai.agent.description") {
        attributes.push(string("gen_ai.agent.description", description));
    }
    if !session.is_empty() {
        attributes.push(string("gen_ai.conversation.id", session));
    }
    if !request_model.is_empty() {
        attributes.push(string("gen_ai.request.model", request_model));
    }
    if let Some((input, output)) = usage {
        attributes.push(int("gen_ai.usage.input_tokens", input));
        attributes.push(int("gen_ai.usage.output_tokens", output));
    }
    let state = run.state();
    attributes.extend([
        string("corral.run.id", run_id),
        string("corral.state", state.name()),
        string(
            "corral.sandbox.provider",
            if run.provider.is_empty() {
                "local"
            } else {
                run.provider.as_str()
            },
        ),
        double("corral.cost_usd", run.cost_usd),
    ]);
    if !run.sandbox_id.is_empty() {
        attributes.push(string("corral.sandbox.id", run.sandbox_id.clone()));
    }
    if let Some(code) = run.exit_code {
        attributes.push(int("corral.exit_code", code.into()));
    }
    if !run.reason.is_empty() {
        attributes.push(string("corral.reason", run.reason.clone()));
    }
    if run.turn > 1 {
        attributes.push(int("corral.turns", run.turn.into()));
    }
    if truncated {
        attributes.push(boolean("corral.trace.truncated", true));
    }
    let status = match state {
        RunState::Failed | RunState::TimedOut => {
            attributes.push(string("error.type", state.name()));
            error_status(if run.reason.is_empty() {
                state.name().to_owned()
            } else {
                run.reason.clone()
            })
        }
        _ => None,
    };
    for transition in transitions {
        let mut attributes = vec![
            string("corral.state.to", transition.to_state.clone()),
            string("corral.actor", transition.actor.clone()),
        ];
        if let Some(from) = &transition.from_state {
            attributes.push(string("corral.state.from", from.clone()));
        }
        if !transition.reason.is_empty() {
            attributes.push(string("corral.reason", transition.reason.clone()));
        }
        if let Some(sandbox) = transition.sandbox_id.as_ref().filter(|s| !s.is_empty()) {
            attributes.push(string("corral.sandbox.id", sandbox.clone()));
        }
        root_events.push(Event {
            time_unix_nano: nanos(clamp(transition.at_ms)),
            name: format!("corral.{}", transition.event),
            attributes,
            ..Default::default()
        });
    }
    root_events.sort_by_key(|e| e.time_unix_nano);
    let root = Span {
        trace_id: trace,
        span_id: root_id,
        name: if agent_name.is_empty() {
            "invoke_agent".into()
        } else {
            format!("invoke_agent {agent_name}")
        },
        kind: SpanKind::Client as i32,
        start_time_unix_nano: nanos(start),
        end_time_unix_nano: nanos(end),
        attributes,
        events: root_events,
        status,
        ..Default::default()
    };
    let mut spans = Vec::with_capacity(children.len() + 1);
    spans.push(root);
    spans.extend(children);
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", "corral"),
                    string("corral.subject_prefix", prefix),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "corral.genai".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                schema_url: SCHEMA_URL.into(),
            }],
            schema_url: SCHEMA_URL.into(),
        }],
    }
}

/// Attributes of a span as a map, for tests and readers.
pub fn attributes(span: &Span) -> BTreeMap<String, Value> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Any::StringValue(s) => Value::from(s.clone()),
                Any::IntValue(i) => Value::from(*i),
                Any::DoubleValue(d) => Value::from(*d),
                Any::BoolValue(b) => Value::from(*b),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::v1::RunSpec;
    use serde_json::json;

    fn run(state: RunState) -> Run {
        Run {
            run_id: "r1".into(),
            state: state as i32,
            spec: Some(RunSpec {
                argv: vec!["/usr/bin/claude".into(), "-p".into()],
                labels: [("gen_ai.provider.name".to_owned(), "anthropic".to_owned())].into(),
                ..Default::default()
            }),
            sandbox_id: "sbx-1".into(),
            provider: "local".into(),
            exit_code: Some(0),
            created_at_ms: 1_000,
            running_at_ms: 1_100,
            finished_at_ms: 2_000,
            cost_usd: 0.25,
            ..Default::default()
        }
    }

    fn event(id: &str, kind: &str, at_ms: i64, data: Value) -> StoredEvent {
        StoredEvent {
            event_id: id.into(),
            kind: kind.into(),
            at_ms,
            data,
        }
    }

    fn transition(event: &str, from: Option<&str>, to: &str, at_ms: i64) -> Transition {
        Transition {
            from_state: from.map(str::to_owned),
            to_state: to.into(),
            event: event.into(),
            reason: String::new(),
            actor: "test".into(),
            at_ms,
            sandbox_id: None,
        }
    }

    fn spans(request: &ExportTraceServiceRequest) -> &[Span] {
        &request.resource_spans[0].scope_spans[0].spans
    }

    fn history() -> Vec<Transition> {
        vec![
            transition("claim", Some("pending"), "booting", 1_050),
            transition("start", Some("booting"), "running", 1_100),
            transition("complete", Some("running"), "completed", 2_000),
        ]
    }

    #[test]
    fn a_run_becomes_a_root_with_tool_and_chat_children() {
        let events = vec![
            event(
                "e1",
                "agent.started",
                1_200,
                json!({"session_id": "s-1", "model": "claude-x"}),
            ),
            event(
                "e2",
                "agent.assistant_message",
                1_300,
                json!({"role": "assistant", "text": "hi", "model": "claude-x", "usage": {"input_tokens": 10, "output_tokens": 4}}),
            ),
            event(
                "e3",
                "agent.tool_use",
                1_400,
                json!({"tool_use_id": "t1", "tool": "Edit"}),
            ),
            event(
                "e4",
                "agent.file_edited",
                1_450,
                json!({"path": "a.rs", "unified_diff": "+x\n", "turn": 1}),
            ),
            event(
                "e5",
                "agent.tool_completed",
                1_500,
                json!({"tool_use_id": "t1", "is_error": false}),
            ),
            event(
                "e6",
                "agent.tool_use",
                1_600,
                json!({"tool_use_id": "t2", "tool": "Bash"}),
            ),
        ];
        let request = build(
            &run(RunState::Completed),
            &history(),
            &events,
            "corral",
            false,
        );
        let spans = spans(&request);
        assert_eq!(spans.len(), 4, "root, chat, two tools");
        let root = &spans[0];
        assert_eq!(root.name, "invoke_agent claude");
        assert_eq!(root.kind, SpanKind::Client as i32);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.trace_id, trace_id("r1"));
        assert_eq!(root.start_time_unix_nano, 1_000_000_000);
        assert_eq!(root.end_time_unix_nano, 2_000_000_000);
        assert!(root.status.is_none(), "a completed run has no error status");
        let a = attributes(root);
        assert_eq!(a["gen_ai.operation.name"], "invoke_agent");
        assert_eq!(a["gen_ai.provider.name"], "anthropic");
        assert_eq!(a["gen_ai.agent.name"], "claude");
        assert_eq!(a["gen_ai.agent.id"], "r1");
        assert_eq!(a["gen_ai.conversation.id"], "s-1");
        assert_eq!(a["gen_ai.request.model"], "claude-x");
        assert_eq!(a["gen_ai.usage.input_tokens"], 10);
        assert_eq!(a["corral.run.id"], "r1");
        assert_eq!(a["corral.sandbox.id"], "sbx-1");
        assert_eq!(a["corral.cost_usd"], 0.25);
        assert_eq!(a["corral.state"], "completed");
        assert_eq!(a["corral.exit_code"], 0);
        let names: Vec<&str> = root.events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["corral.claim", "corral.start", "corral.complete"]);

        let chat = &spans[1];
        assert_eq!(chat.name, "chat claude-x");
        assert_eq!(chat.parent_span_id, root.span_id);
        assert_eq!(
            chat.start_time_unix_nano, 1_200_000_000,
            "from the agent's previous step"
        );
        let c = attributes(chat);
        assert_eq!(c["gen_ai.usage.output_tokens"], 4);
        assert_eq!(c["gen_ai.conversation.id"], "s-1");

        let edit = &spans[2];
        assert_eq!(edit.name, "execute_tool Edit");
        assert_eq!(edit.kind, SpanKind::Internal as i32);
        assert_eq!(attributes(edit)["gen_ai.tool.call.id"], "t1");
        assert_eq!(edit.end_time_unix_nano, 1_500_000_000);
        assert_eq!(
            edit.events[0].name, "corral.file_edited",
            "the edit is the tool's doing"
        );
        assert!(edit.status.is_none());

        let bash = &spans[3];
        assert_eq!(
            bash.end_time_unix_nano, 2_000_000_000,
            "never completed: ends with the run"
        );
        assert_eq!(
            bash.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32)
        );

        let again = build(
            &run(RunState::Completed),
            &history(),
            &events,
            "corral",
            false,
        );
        assert_eq!(
            again, request,
            "the same run gives the same trace, ids included"
        );
    }

    #[test]
    fn a_failed_run_has_an_error_status_and_no_chat_without_a_model() {
        let mut failed = run(RunState::Failed);
        failed.reason = "agent exited with 3".into();
        if let Some(spec) = failed.spec.as_mut() {
            spec.labels.clear();
        }
        let events = vec![event(
            "e1",
            "agent.assistant_message",
            1_300,
            json!({"role": "assistant", "text": "no model here"}),
        )];
        let request = build(&failed, &history(), &events, "corral", false);
        let spans = spans(&request);
        assert_eq!(spans.len(), 1, "a message without a model is no chat span");
        let root = &spans[0];
        assert_eq!(
            root.status,
            Some(Status {
                code: StatusCode::Error as i32,
                message: "agent exited with 3".into()
            })
        );
        let a = attributes(root);
        assert_eq!(a["error.type"], "failed");
        assert!(
            !a.contains_key("gen_ai.provider.name"),
            "unknown without a label or a model"
        );
    }

    #[test]
    fn times_outside_the_run_are_kept_inside_it() {
        let events = vec![
            event("e1", "agent.tool_use", 500, json!({"tool": "Read"})),
            event("e2", "agent.tool_completed", 9_000, json!({})),
        ];
        let request = build(
            &run(RunState::Completed),
            &history(),
            &events,
            "corral",
            false,
        );
        let tool = &spans(&request)[1];
        assert_eq!(tool.start_time_unix_nano, 1_000_000_000);
        assert_eq!(tool.end_time_unix_nano, 2_000_000_000);
        assert!(tool.status.is_none(), "matched without ids, oldest first");
    }

    #[test]
    fn providers_are_known_by_their_models_names() {
        assert_eq!(provider_of_model("claude-sonnet-4-5"), Some("anthropic"));
        assert_eq!(provider_of_model("openai/gpt-5"), Some("openai"));
        assert_eq!(provider_of_model("o3-mini"), Some("openai"));
        assert_eq!(provider_of_model("gemini-2.5-pro"), Some("gcp.gen_ai"));
        assert_eq!(provider_of_model("demo-model"), None);
    }

    #[test]
    fn ids_are_derived_from_the_run_and_never_zero() {
        assert_eq!(trace_id("r1"), trace_id("r1"));
        assert_ne!(trace_id("r1"), trace_id("r2"));
        assert_eq!(trace_id("r1").len(), 16);
        assert_eq!(span_id("r1", "root").len(), 8);
        assert_ne!(span_id("r1", "root"), span_id("r2", "root"));
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(1000), Duration::from_secs(60));
    }

    #[test]
    fn the_endpoint_is_set_by_corral_genai_traces() {
        let env = std::collections::HashMap::from([(
            "CORRAL_GENAI_TRACES".to_owned(),
            "http://collector:4318/v1/traces".to_owned(),
        )]);
        let config = crate::config::Flags::default().load(&env).expect("loads");
        assert_eq!(
            config.genai_traces.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let config = crate::config::Flags::default()
            .load(&Default::default())
            .expect("loads");
        assert_eq!(config.genai_traces, None, "off unless set");
    }

    #[test]
    fn the_url_must_be_http() {
        assert!(parse_url("http://collector:4318/v1/traces").is_ok());
        assert!(parse_url("collector:4318").is_err());
        assert!(parse_url("ftp://collector/v1/traces").is_err());
    }
}
