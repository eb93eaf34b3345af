//! GenAI traces: a real run whose agent posts messages with model and
//! usage, two tool calls and a file edit over HTTP ends, and event ingest
//! exports it as one OpenTelemetry trace to an OTLP/HTTP receiver inside
//! the test, which decodes the protobuf; also when that receiver first
//! answers 503.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use corral_event_ingest::genai;
use corral_proto::v1::RunState;
use corral_tests::{InProcess, TOKEN_SECRET, TestEnv};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode as Code};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);
const MODEL: &str = "claude-test-1";
const SESSION: &str = "sess-genai";

/// An OTLP/HTTP traces receiver: decodes each POST /v1/traces and hands
/// the accepted requests to the test; answers 503 to the first `refuse`.
struct Receiver {
    url: String,
    accepted: mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    attempts: Arc<AtomicUsize>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct Collector {
    accepted: mpsc::UnboundedSender<ExportTraceServiceRequest>,
    attempts: Arc<AtomicUsize>,
    refuse: usize,
}

async fn export(
    State(collector): State<Collector>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let attempt = collector.attempts.fetch_add(1, Ordering::SeqCst);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/x-protobuf"),
        "OTLP/HTTP protobuf is posted as application/x-protobuf"
    );
    let request =
        ExportTraceServiceRequest::decode(body).expect("the body is an OTLP trace export");
    if attempt < collector.refuse {
        return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
    }
    let _ = collector.accepted.send(request);
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Receiver {
    async fn start(refuse: usize) -> Receiver {
        let (sender, accepted) = mpsc::unbounded_channel();
        let attempts = Arc::new(AtomicUsize::new(0));
        let collector = Collector {
            accepted: sender,
            attempts: attempts.clone(),
            refuse,
        };
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export))
            .with_state(collector);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port for the receiver");
        let url = format!(
            "http://{}/v1/traces",
            listener.local_addr().expect("bound address")
        );
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
                .expect("the receiver serves");
        });
        Receiver {
            url,
            accepted,
            attempts,
            stop,
        }
    }

    /// The spans of the next accepted export, which must be the trace of
    /// `run_id` (this test's runs are traced one after the other).
    async fn next_trace(&mut self, run_id: &str) -> Vec<Span> {
        let request = tokio::time::timeout(LIMIT, self.accepted.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("timed out after {LIMIT:?}: the trace of run {run_id} was exported")
            })
            .expect("the receiver is running");
        spans(&request)
    }
}

fn spans(request: &ExportTraceServiceRequest) -> Vec<Span> {
    request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| s.spans.clone())
        .collect()
}

/// An agent that posts what a coding agent reports, with curl and its run
/// token: started, a message with model and usage, an Edit call with the
/// file edit it made, a Bash call, a last message, completed.
fn agent(env: &TestEnv, labels: &[(&str, &str)]) -> corral_proto::v1::RunCommand {
    let message = |text: &str, input: u64, output: u64| {
        json!({ "kind": "agent.assistant_message", "data": {
            "role": "assistant", "text": text, "model": MODEL,
            "usage": { "input_tokens": input, "output_tokens": output } } })
    };
    let events = [
        json!({ "kind": "agent.started", "data": { "session_id": SESSION, "model": MODEL } }),
        message("I will edit a.txt", 120, 30),
        json!({ "kind": "agent.tool_use", "data": { "tool_use_id": "call-1", "tool": "Edit", "input": { "path": "a.txt" } } }),
        json!({ "kind": "agent.file_edited", "data": { "path": "a.txt", "unified_diff": "+hi\n", "turn": 1 } }),
        json!({ "kind": "agent.tool_completed", "data": { "tool_use_id": "call-1", "result": "ok", "duration_ms": 3 } }),
        json!({ "kind": "agent.tool_use", "data": { "tool_use_id": "call-2", "tool": "Bash", "input": { "command": "cat a.txt" } } }),
        json!({ "kind": "agent.tool_completed", "data": { "tool_use_id": "call-2", "result": "hi", "duration_ms": 2 } }),
        message("done", 200, 10),
        json!({ "kind": "agent.completed", "data": { "summary": "edited a.txt", "session_id": SESSION } }),
    ];
    let mut script = String::from(
        "set -e\npost() { curl -sSf -o /dev/null -H \"Authorization: Bearer $CORRAL_TOKEN\" \
         -H 'Content-Type: application/json' --data-binary \"$1\" \
         \"$CORRAL_EVENTS_URL/v1/runs/$CORRAL_RUN_ID/events\"; }\n",
    );
    // No event holds a single quote: each is one shell word as it is.
    for event in events {
        script.push_str(&format!("post '{event}'\n"));
    }
    let mut command = env.command(&["sh", "-c", &script]);
    if let Some(spec) = command.spec.as_mut() {
        spec.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }
    command
}

/// Tracker, event ingest exporting to `receiver` and a spawner whose
/// agents post to that ingest.
async fn services(env: &TestEnv, receiver: &Receiver) -> [InProcess; 3] {
    assert!(
        std::path::Path::new("/usr/bin/curl").exists(),
        "the test agent posts with curl: install it (apt-get install curl)"
    );
    let tracker = env.start_tracker().await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config.genai_traces = Some(receiver.url.clone());
    let (ingest, url) = env.start_ingest_with(config).await;
    let mut spawner = env.spawner_config();
    spawner.events_url = url;
    spawner.token_secret = corral_common::Secret::new(TOKEN_SECRET);
    let spawner = env.start_spawner_with(spawner).await;
    [tracker, ingest, spawner]
}

async fn run_to_the_end(env: &TestEnv, command: &corral_proto::v1::RunCommand) {
    let client = env.client().await;
    client.start_run(command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        run.state(),
        RunState::Completed,
        "run {} ended {} ({}); output: {:?}",
        run.run_id,
        run.state().name(),
        run.reason,
        env.output(&run.run_id).await
    );
}

fn attributes(span: &Span) -> BTreeMap<String, Value> {
    genai::attributes(span)
}

/// Checks the whole trace of the test agent's run; returns its root.
fn check_trace(spans: &[Span], run_id: &str) -> Span {
    let trace = genai::trace_id(run_id);
    assert!(
        spans.iter().all(|s| s.trace_id == trace),
        "every span of the export is in the run's trace"
    );
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {spans:#?}");
    let root = roots[0].clone();
    assert_eq!(root.name, "invoke_agent test-coder");
    assert_eq!(root.kind, SpanKind::Client as i32);
    assert!(root.start_time_unix_nano < root.end_time_unix_nano);
    let a = attributes(&root);
    assert_eq!(a["gen_ai.operation.name"], "invoke_agent");
    assert_eq!(a["gen_ai.provider.name"], "anthropic", "known by the model");
    assert_eq!(a["gen_ai.agent.name"], "test-coder");
    assert_eq!(a["gen_ai.agent.id"], run_id);
    assert_eq!(a["gen_ai.conversation.id"], SESSION);
    assert_eq!(a["gen_ai.request.model"], MODEL);
    assert_eq!(a["gen_ai.usage.input_tokens"], 320);
    assert_eq!(a["gen_ai.usage.output_tokens"], 40);
    assert_eq!(a["corral.run.id"], run_id);
    assert_eq!(a["corral.state"], "completed");
    assert_eq!(a["corral.exit_code"], 0);
    assert_eq!(a["corral.sandbox.provider"], "local");
    assert!(
        a["corral.sandbox.id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sbx-")),
        "{a:?}"
    );
    assert!(a["corral.cost_usd"].as_f64().is_some(), "{a:?}");
    assert!(root.status.is_none(), "a completed run has no error status");
    let lifecycle: Vec<&str> = root.events.iter().map(|e| e.name.as_str()).collect();
    for step in ["corral.claim", "corral.start", "corral.complete"] {
        assert!(lifecycle.contains(&step), "{step} in {lifecycle:?}");
    }

    let tools: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("execute_tool"))
        .collect();
    let names: Vec<&str> = tools.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["execute_tool Edit", "execute_tool Bash"]);
    for (tool, (name, call)) in tools.iter().zip([("Edit", "call-1"), ("Bash", "call-2")]) {
        assert_eq!(
            tool.parent_span_id, root.span_id,
            "{} under the root",
            tool.name
        );
        assert_eq!(tool.kind, SpanKind::Internal as i32);
        let t = attributes(tool);
        assert_eq!(t["gen_ai.operation.name"], "execute_tool");
        assert_eq!(t["gen_ai.tool.name"], name);
        assert_eq!(t["gen_ai.tool.call.id"], call);
        assert!(tool.start_time_unix_nano <= tool.end_time_unix_nano);
        assert!(
            tool.status
                .as_ref()
                .is_none_or(|s| s.code != Code::Error as i32),
            "{} completed without error",
            tool.name
        );
    }
    let edit = tools[0]
        .events
        .iter()
        .find(|e| e.name == "corral.file_edited")
        .expect("the file edit is an event of the Edit call");
    assert!(
        edit.attributes
            .iter()
            .any(|kv| kv.key == "corral.file.path"),
        "{edit:?}"
    );

    let chats: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("chat"))
        .collect();
    assert_eq!(chats.len(), 2, "one chat span per message with a model");
    for chat in &chats {
        assert_eq!(chat.name, format!("chat {MODEL}"));
        assert_eq!(chat.parent_span_id, root.span_id);
        assert_eq!(chat.kind, SpanKind::Client as i32);
        let c = attributes(chat);
        assert_eq!(c["gen_ai.operation.name"], "chat");
        assert_eq!(c["gen_ai.request.model"], MODEL);
        assert_eq!(c["gen_ai.provider.name"], "anthropic");
        assert_eq!(c["gen_ai.conversation.id"], SESSION);
    }
    let first = attributes(chats[0]);
    assert_eq!(first["gen_ai.usage.input_tokens"], 120);
    assert_eq!(first["gen_ai.usage.output_tokens"], 30);
    assert_eq!(spans.len(), 5, "root, two tool calls, two chats");
    for span in spans {
        assert!(
            span.start_time_unix_nano >= root.start_time_unix_nano
                && span.end_time_unix_nano <= root.end_time_unix_nano,
            "{} lies within the run",
            span.name
        );
    }
    root
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_run_is_exported_as_one_genai_trace() {
    let env = TestEnv::new().await;
    let mut receiver = Receiver::start(0).await;
    let [tracker, ingest, spawner] = services(&env, &receiver).await;

    let command = agent(&env, &[("gen_ai.agent.name", "test-coder")]);
    run_to_the_end(&env, &command).await;
    let spans = receiver.next_trace(&command.run_id).await;
    check_trace(&spans, &command.run_id);

    spawner.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    receiver.stop.cancel();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_refused_by_an_unavailable_collector_arrives_once_whole_later() {
    let env = TestEnv::new().await;
    let mut receiver = Receiver::start(2).await;
    let [tracker, ingest, spawner] = services(&env, &receiver).await;

    let command = agent(&env, &[("gen_ai.agent.name", "test-coder")]);
    run_to_the_end(&env, &command).await;
    let spans = receiver.next_trace(&command.run_id).await;
    check_trace(&spans, &command.run_id);
    assert_eq!(
        receiver.attempts.load(Ordering::SeqCst),
        3,
        "two refused attempts, then the accepted one"
    );

    // A later run's trace is a fence: by the time it arrives, the first
    // was not sent again.
    let later = agent(&env, &[("gen_ai.agent.name", "test-coder")]);
    run_to_the_end(&env, &later).await;
    check_trace(&receiver.next_trace(&later.run_id).await, &later.run_id);
    assert!(
        receiver.accepted.try_recv().is_err(),
        "nothing else was exported"
    );
    assert_eq!(receiver.attempts.load(Ordering::SeqCst), 4);

    spawner.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    receiver.stop.cancel();
    env.cleanup().await;
}
