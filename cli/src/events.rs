//! `corral events` (read a run's agent events from the stream) and
//! `corral agent-demo` (the reference agent: posts a realistic event
//! sequence through event-ingest's HTTP API).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer;
use corral_proto::v1::{AgentEvent, agent_event::Payload};
use futures::StreamExt;
use prost::Message;
use serde_json::json;

use crate::commands::Global;

#[derive(clap::Args)]
#[command(
    after_help = "Reads the events stream directly (NATS_URL). Example:\n  corral events <run-id> --kind agent.tool_use --follow"
)]
pub struct EventsArgs {
    /// The run whose events to show.
    run_id: String,
    /// Only events of this kind (e.g. agent.output, agent.tool_use).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Keep following new events until interrupted.
    #[arg(long)]
    follow: bool,
}

pub async fn events(global: &Global, args: EventsArgs) -> anyhow::Result<ExitCode> {
    corral_proto::validate_run_id(&args.run_id)?;
    if let Some(kind) = &args.kind
        && !corral_proto::kinds::is_known(kind)
    {
        bail!("unknown kind {kind:?}");
    }
    let client = global.client().await?;
    let subjects = client.subjects();
    let filter = match &args.kind {
        Some(kind) => subjects.events(&args.run_id, kind),
        None => subjects.events_of_run(&args.run_id),
    };
    let stream = client
        .jetstream()
        .get_stream(subjects.events_stream())
        .await
        .context("no events stream")?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let total = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut seen = 0u64;
    loop {
        if !args.follow && seen >= total {
            break;
        }
        let wait = if args.follow {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(5)
        };
        let Ok(Some(message)) = tokio::time::timeout(wait, messages.next()).await else {
            break;
        };
        let message = message?;
        seen += 1;
        let cursor = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let Ok(event) = AgentEvent::decode(message.payload.clone()) else {
            continue;
        };
        if global.json {
            let (data, truncated) = corral_event_ingest::wire::data_json(&event, usize::MAX);
            let line = json!({
                "cursor": cursor, "event_id": event.event_id, "run_id": event.run_id, "seq": event.seq,
                "kind": event.kind, "at_ms": event.at_ms, "data": data, "truncated": truncated,
            });
            println!("{line}");
        } else {
            println!("{:>8}  {:<24}  {}", cursor, event.kind, summary(&event));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(event: &AgentEvent) -> String {
    match &event.payload {
        Some(Payload::Output(p)) => p.line.clone(),
        Some(Payload::Message(p)) => format!("{}: {}", p.role, p.text),
        Some(Payload::ToolUse(p)) => format!("{} {}", p.tool, p.input_json),
        Some(Payload::ToolCompleted(p)) => format!("{} ms: {}", p.duration_ms, p.result),
        Some(Payload::FileEdited(p)) => format!("{} ({} diff bytes)", p.path, p.unified_diff.len()),
        Some(Payload::Started(p)) => format!("session {} model {}", p.session_id, p.model),
        Some(Payload::Completed(p)) => p.summary.clone(),
        Some(Payload::Error(p)) => p.message.clone(),
        Some(Payload::Heartbeat(_)) | None => String::new(),
    }
}

#[derive(clap::Args)]
#[command(
    after_help = "Runs inside a sandbox: reads CORRAL_EVENTS_URL, CORRAL_TOKEN and CORRAL_RUN_ID. \
`corral up --demo` runs it as its demo agent."
)]
pub struct AgentDemoArgs {
    /// Pause between steps, ms.
    #[arg(long, default_value_t = 200)]
    step_ms: u64,
    /// Heartbeat period while working, seconds.
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
}

/// The reference agent: started, assistant message, tool_use Write,
/// file_edited with a diff, tool_use Bash, tool_completed, completed, with
/// heartbeats every `heartbeat_secs`, all through the HTTP API.
pub async fn agent_demo(args: AgentDemoArgs) -> anyhow::Result<ExitCode> {
    let var = |name: &str| {
        std::env::var(name)
            .with_context(|| format!("{name} is not set: run me inside a corral sandbox"))
    };
    let (url, token, run_id) = (
        var("CORRAL_EVENTS_URL")?,
        var("CORRAL_TOKEN")?,
        var("CORRAL_RUN_ID")?,
    );
    let http = reqwest::Client::new();
    let endpoint = format!("{url}/v1/runs/{run_id}/events");
    let mut seq = 0u64;
    let mut post = async |kind: &str, data: serde_json::Value| -> anyhow::Result<()> {
        seq += 1;
        let response = http
            .post(&endpoint)
            .bearer_auth(&token)
            .json(&json!({ "kind": kind, "seq": seq, "data": data }))
            .send()
            .await
            .with_context(|| format!("cannot reach event ingest at {url}"))?;
        if !response.status().is_success() {
            bail!(
                "{kind} refused: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    };
    let step = Duration::from_millis(args.step_ms);
    // Heartbeats prove liveness (not progress) every `heartbeat_secs` while the agent works.
    let heartbeat = {
        let (http, endpoint, token) = (http.clone(), endpoint.clone(), token.clone());
        let period = Duration::from_secs(args.heartbeat_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                let beat = json!({ "kind": "agent.heartbeat", "data": {} });
                if let Err(err) = http
                    .post(&endpoint)
                    .bearer_auth(&token)
                    .json(&beat)
                    .send()
                    .await
                {
                    eprintln!("heartbeat failed: {err}");
                }
            }
        })
    };
    let session = format!("demo-{}", &run_id[..run_id.len().min(8)]);
    post(
        "agent.started",
        json!({ "session_id": session, "model": "demo-model" }),
    )
    .await?;
    tokio::time::sleep(step).await;
    post(
        "agent.assistant_message",
        json!({ "role": "assistant", "text": "I will write hello.txt, then run it through wc." }),
    )
    .await?;
    post("agent.tool_use", json!({ "tool_use_id": "t1", "tool": "Write", "input": { "path": "hello.txt", "content": "hello from corral\n" } })).await?;
    std::fs::write("hello.txt", "hello from corral\n").context("cannot write hello.txt")?;
    post(
        "agent.file_edited",
        json!({ "path": "hello.txt", "turn": 1, "unified_diff": "--- /dev/null\n+++ b/hello.txt\n@@ -0,0 +1 @@\n+hello from corral\n" }),
    )
    .await?;
    tokio::time::sleep(step).await;
    post(
        "agent.tool_use",
        json!({ "tool_use_id": "t2", "tool": "Bash", "input": { "command": "wc -c hello.txt" } }),
    )
    .await?;
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new("wc")
        .args(["-c", "hello.txt"])
        .output()
        .await?;
    let result = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    println!("{result}");
    post(
        "agent.tool_completed",
        json!({ "tool_use_id": "t2", "result": result, "duration_ms": started.elapsed().as_millis() as u64, "is_error": !output.status.success() }),
    )
    .await?;
    tokio::time::sleep(step).await;
    post(
        "agent.completed",
        json!({ "summary": "wrote hello.txt and counted its bytes", "session_id": session }),
    )
    .await?;
    heartbeat.abort();
    Ok(ExitCode::SUCCESS)
}
