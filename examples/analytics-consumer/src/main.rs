//! An analytics consumer of corral's agent events: its own durable consumer
//! on the events stream, so it receives every event at least once, at its
//! own pace, and resumes where it stopped; `--since` replays from a time.
//! It keeps, per run, tool-use counts by tool and the set of edited files,
//! and prints them every `--report-secs` and when it stops.
//!
//! The same pattern in any language: create (or bind to) a durable pull
//! consumer named after your application on stream `<PREFIX>_EVENTS` with
//! filter `<prefix>.events.>`, decode `corral.v1.AgentEvent`, ack after you
//! processed it. Events may arrive twice (at-least-once): key your state by
//! `event_id` when that matters.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use corral_proto::Subjects;
use corral_proto::v1::{AgentEvent, agent_event::Payload};
use futures::StreamExt;
use prost::Message;

#[derive(Parser)]
#[command(about = "Counts tool use and edited files per run from corral's agent events")]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Subject prefix of the deployment.
    #[arg(long, env = "CORRAL_SUBJECT_PREFIX", default_value = "corral")]
    prefix: String,
    /// Durable consumer name: one per analytics application.
    #[arg(long, default_value = "analytics-example")]
    name: String,
    /// Replay from this time (RFC 3339) when the consumer is first created.
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Print the figures this often, seconds.
    #[arg(long, default_value_t = 10)]
    report_secs: u64,
    /// Stop after this many events (0 = never).
    #[arg(long, default_value_t = 0)]
    max_events: u64,
    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "NATS_CREDS", value_name = "FILE")]
    nats_creds: Option<std::path::PathBuf>,
    /// File holding an nkey user seed (`corral keys nats` writes analytics.nk).
    #[arg(long, env = "NATS_NKEY", value_name = "FILE")]
    nats_nkey: Option<std::path::PathBuf>,
    /// The nkey user seed itself (`corral keys init` writes analytics.env).
    #[arg(long, env = "CORRAL_NATS_AUTH__NKEY_SEED", hide_env_values = true)]
    nats_nkey_seed: Option<String>,
    /// NATS user and password.
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    nats_user: Option<String>,
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// CA certificate for TLS to NATS.
    #[arg(long, env = "NATS_CA", value_name = "FILE")]
    nats_ca: Option<std::path::PathBuf>,
    /// The reply inbox this credential may read (`_INBOX_analytics` for the
    /// generated analytics user).
    #[arg(long, env = "CORRAL_NATS_AUTH__INBOX_PREFIX")]
    inbox_prefix: Option<String>,
}

/// Connect options from the credential flags: any one of the NATS ways.
async fn connect_options(args: &Args) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut options = async_nats::ConnectOptions::new().name(args.name.clone());
    if let Some(path) = &args.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("--nats-creds {}", path.display()))?;
    }
    if let Some(path) = &args.nats_nkey {
        let seed = std::fs::read_to_string(path)
            .with_context(|| format!("--nats-nkey {}", path.display()))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(seed) = &args.nats_nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let (Some(user), Some(password)) = (&args.nats_user, &args.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &args.nats_token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &args.nats_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some(prefix) = &args.inbox_prefix {
        options = options.custom_inbox_prefix(prefix.clone());
    }
    Ok(options)
}

#[derive(Default)]
struct RunStats {
    tools: BTreeMap<String, u64>,
    files: BTreeSet<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let subjects = Subjects::new(&args.prefix)?;
    // One URL, or a cluster's comma-separated seed list.
    let seeds = args
        .nats_url
        .split(',')
        .map(|url| url.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("--nats-url is not a NATS URL or a comma-separated list of them")?;
    let nats = connect_options(&args)
        .await?
        .connect(seeds)
        .await
        .context("cannot reach NATS (credentials: --nats-creds, --nats-nkey, ...)")?;
    let js = jetstream::new(nats);
    let stream = js
        .get_stream(subjects.events_stream())
        .await
        .context("no events stream: is corral running?")?;
    let deliver_policy = match args.since {
        Some(since) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                since.timestamp_nanos_opt().unwrap_or(0) as i128,
            )?,
        },
        None => consumer::DeliverPolicy::All,
    };
    let consumer = stream
        .get_or_create_consumer(
            &args.name,
            consumer::pull::Config {
                durable_name: Some(args.name.clone()),
                filter_subject: subjects.events_all(),
                deliver_policy,
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut stats: BTreeMap<String, RunStats> = BTreeMap::new();
    let mut seen_ids = HashSet::new();
    let mut count = 0u64;
    let mut report = tokio::time::interval(Duration::from_secs(args.report_secs.max(1)));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = report.tick() => print(&stats, count),
            message = messages.next() => {
                let Some(message) = message else { break };
                let message = message.map_err(|e| anyhow::anyhow!(e))?;
                if let Ok(event) = AgentEvent::decode(message.payload.clone())
                    && seen_ids.insert(event.event_id.clone())
                {
                    let run = stats.entry(event.run_id.clone()).or_default();
                    match event.payload {
                        Some(Payload::ToolUse(tool)) => *run.tools.entry(tool.tool).or_default() += 1,
                        Some(Payload::FileEdited(edit)) => {
                            run.files.insert(edit.path);
                        }
                        _ => {}
                    }
                    count += 1;
                }
                message.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                if args.max_events > 0 && count >= args.max_events {
                    break;
                }
            }
        }
    }
    print(&stats, count);
    Ok(())
}

fn print(stats: &BTreeMap<String, RunStats>, count: u64) {
    println!("{count} events");
    for (run_id, run) in stats {
        let tools: Vec<String> = run
            .tools
            .iter()
            .map(|(tool, n)| format!("{tool}={n}"))
            .collect();
        println!(
            "  {run_id}: tool use [{}], {} files edited",
            tools.join(" "),
            run.files.len()
        );
    }
}
