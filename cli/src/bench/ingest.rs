//! `corral bench ingest`: sustained events/s from first publish to last row
//! committed, ingest lag (accepted -> committed), and, on the same machine in
//! the same run, the rate of a plain COPY of the same rows. `--floor` puts a
//! consumer that stores nothing in event ingest's place: what JetStream
//! alone allows.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_proto::v1::{AgentEvent, ToolUse, agent_event::Payload};
use prost::Message;
use sqlx::Connection;
use tokio::sync::Semaphore;

use super::stack::Stack;
use super::{ms, round};
use crate::commands::Global;

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Via {
    Http,
    Nats,
}

#[derive(clap::Args)]
#[command(
    after_help = "Needs NATS_URL and DATABASE_URL (a role that may create databases): it starts its \
own tracker and event ingest on a scratch database and removes them after.\n\nExamples:\n  corral bench ingest --events 100000 --runs 100 --via nats\n  corral bench ingest --events 200000 --rate 20000   # lag under a steady load\n  corral bench ingest --events 200000 --readers 4    # while four consoles read pages\n  corral bench ingest --events 200000 --floor        # JetStream alone, nothing stored"
)]
pub struct IngestArgs {
    /// Events to send.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Runs they are spread over.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Through event ingest's HTTP API (batches of --batch) or straight onto the stream.
    #[arg(long, value_enum, default_value_t = Via::Nats)]
    via: Via,
    /// Events per HTTP request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Send at this steady rate (events per second) instead of as fast as
    /// possible: the lag figures then describe a sustained load, not a burst
    /// the ingest works off afterwards.
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    rate: Option<u32>,
    /// Readers paging through runs' events over the HTTP API while the
    /// events arrive, as consoles and analytics would: their page
    /// latency is reported, and what reading costs ingest shows in its rate.
    #[arg(long, default_value_t = 0)]
    readers: usize,
    /// Pages each reader reads per second (20 is what one API key may by
    /// default).
    #[arg(long, default_value_t = 20, value_name = "PAGES_PER_SEC")]
    read_rate: u32,
    /// The machine's floor for --via nats, not corral's figure: the same
    /// events published the same way, taken by a consumer of the bench that
    /// acks each one and stores nothing (event ingest is stopped once it
    /// has made its table). Its rate is the most that one JetStream message
    /// per event allows here, beside the same COPY.
    #[arg(long, conflicts_with_all = ["readers", "rate"])]
    floor: bool,
}

/// Paces sending at a steady rate: the n-th event is due n/rate seconds
/// after the start.
struct Pacer {
    started: tokio::time::Instant,
    rate: Option<u32>,
}

impl Pacer {
    async fn until(&self, sent: usize) {
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(sent as f64 / f64::from(rate));
            tokio::time::sleep_until(self.started + due).await;
        }
    }
}

/// COPYs of the same rows, of which the fastest is the reference.
const COPY_ATTEMPTS: usize = 3;

const SECRET: &str = "bench-ingest-secret-0123456789abcdef";

pub async fn run(global: &Global, args: IngestArgs) -> anyhow::Result<ExitCode> {
    if args.events == 0
        || args.runs == 0
        || args.batch == 0
        || args.rate == Some(0)
        || args.read_rate == 0
    {
        bail!("--events, --runs, --batch, --rate and --read-rate must be positive");
    }
    if args.floor && args.via != Via::Nats {
        bail!("--floor measures JetStream alone: use it with --via nats");
    }
    let mut stack = Stack::new(&global.nats_url, "ingest").await?;
    let admin = stack.database_url.clone();
    let scratch = format!("corral_bench_{}", stack.prefix.replace('-', "_"));
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .context("cannot connect to DATABASE_URL")?;
    sqlx::query(&format!("CREATE DATABASE {scratch}"))
        .execute(&mut conn)
        .await?;
    stack.database_url = super::reaper::replace_database(&admin, &scratch);
    let result = measure(&mut stack, &args).await;
    stack.teardown().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
    result
}

fn event(i: usize, runs: usize) -> AgentEvent {
    AgentEvent {
        event_id: format!("bench-{i}"),
        run_id: format!("run-{}", i % runs),
        seq: (i / runs) as u64 + 1,
        at_ms: corral_common::now_ms(),
        kind: "agent.tool_use".into(),
        payload: Some(Payload::ToolUse(ToolUse {
            tool_use_id: format!("t{i}"),
            tool: "Bash".into(),
            input_json: r#"{"command":"cargo test --workspace"}"#.into(),
        })),
    }
}

/// The value of one of event ingest's counters (0 before its first count).
async fn counter(http: &reqwest::Client, metrics_url: &str, name: &str) -> anyhow::Result<u64> {
    let text = http
        .get(metrics_url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("cannot read event ingest's metrics at {metrics_url}"))?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

/// One reader: pages through run after run (100 events a page, from the
/// start), a page `every` so long, until `done`; returns each page's
/// latency in milliseconds.
async fn read_pages(
    http: reqwest::Client,
    url: String,
    reader: usize,
    runs: usize,
    every: Duration,
    done: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::new();
    let mut run = reader % runs;
    let mut after = 0;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !done.is_cancelled() {
        tick.tick().await;
        let asked = Instant::now();
        let answer = http
            .get(format!(
                "{url}/v1/runs/run-{run}/events?after={after}&limit=100"
            ))
            .send()
            .await?;
        let status = answer.status();
        if !status.is_success() {
            bail!(
                "a page read answered {status}: {}",
                answer.text().await.unwrap_or_default()
            );
        }
        let page: serde_json::Value = answer.json().await?;
        latencies.push(ms(asked.elapsed()));
        let next = page["next_after"].as_i64().unwrap_or(after);
        if next == after {
            // The run is read up to the watermark: on to another.
            run = (run + 1) % runs;
            after = 0;
        } else {
            after = next;
        }
    }
    Ok(latencies)
}

async fn measure(stack: &mut Stack, args: &IngestArgs) -> anyhow::Result<ExitCode> {
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (port, metrics_port) = (free_port()?, free_port()?);
    stack.spawn("tracker", &[])?;
    stack.wait_for_tracker().await?;
    let ingest = stack.spawn(
        "event-ingest",
        &[
            ("CORRAL_LISTEN", format!("127.0.0.1:{port}")),
            ("CORRAL_TOKEN_SECRET", SECRET.to_owned()),
            ("CORRAL_METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            ("CORRAL_ANONYMOUS_READS", "true".to_owned()),
            // Readers pace themselves (--read-rate); all share one
            // (anonymous) key, which must not ration them.
            ("CORRAL_READ_RATE_PER_SEC", "1000000".to_owned()),
            ("CORRAL_READ_BURST", "1000000".to_owned()),
        ],
    )?;
    let url = format!("http://127.0.0.1:{port}");
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pool = sqlx::PgPool::connect(&stack.database_url).await?;
    let floor = if args.floor {
        stack.stop(ingest).await;
        Some(consume_alone(stack, args.events).await?)
    } else {
        None
    };

    match args.rate {
        Some(rate) => eprintln!(
            "sending {} events over {} runs via {:?} at {rate} events/s",
            args.events, args.runs, args.via
        ),
        None => eprintln!(
            "sending {} events over {} runs via {:?}",
            args.events, args.runs, args.via
        ),
    }
    let reading = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> = (0..args.readers)
        .map(|reader| {
            let (http, url, runs, done) = (http.clone(), url.clone(), args.runs, reading.clone());
            let every = Duration::from_secs_f64(1.0 / f64::from(args.read_rate));
            tokio::spawn(async move { read_pages(http, url, reader, runs, every, done).await })
        })
        .collect();
    let started = Instant::now();
    let pacer = Pacer {
        started: tokio::time::Instant::now(),
        rate: args.rate,
    };
    match args.via {
        Via::Nats => {
            let js = stack.client.jetstream().clone();
            let subjects = stack.client.subjects().clone();
            let mut acks = std::collections::VecDeque::new();
            for i in 0..args.events {
                pacer.until(i).await;
                let event = event(i, args.runs);
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(corral_proto::headers::MSG_ID, event.event_id.as_str());
                let subject = subjects.events(&event.run_id, &event.kind);
                acks.push_back(
                    js.publish_with_headers(subject, headers, event.encode_to_vec().into())
                        .await?,
                );
                if acks.len() >= 2000
                    && let Some(ack) = acks.pop_front()
                {
                    ack.await?;
                }
            }
            for ack in acks {
                ack.await?;
            }
        }
        Via::Http => {
            let permits = Arc::new(Semaphore::new(16));
            let mut posts = Vec::new();
            for start in (0..args.events).step_by(args.batch * args.runs) {
                for run in 0..args.runs {
                    pacer.until(start + run * args.batch).await;
                    let ids: Vec<usize> = (start
                        ..(start + args.batch * args.runs).min(args.events))
                        .filter(|i| i % args.runs == run)
                        .collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let body: Vec<serde_json::Value> = ids
                        .iter()
                        .map(|i| {
                            serde_json::json!({ "kind": "agent.tool_use", "event_id": format!("bench-{i}"),
                                "seq": i / args.runs + 1, "data": { "tool": "Bash", "input": { "command": "cargo test --workspace" } } })
                        })
                        .collect();
                    let run_id = format!("run-{run}");
                    let token = corral_common::token::Keyring::single("default", SECRET.as_bytes())
                        .mint(&run_id, corral_common::now_ms() + 3_600_000);
                    let permit = permits.clone().acquire_owned().await?;
                    let (http, endpoint) = (http.clone(), format!("{url}/v1/runs/{run_id}/events"));
                    posts.push(tokio::spawn(async move {
                        let answer = http
                            .post(endpoint)
                            .bearer_auth(token)
                            .json(&body)
                            .send()
                            .await;
                        drop(permit);
                        answer.map(|r| r.status().as_u16())
                    }));
                }
            }
            for post in posts {
                let status = post.await??;
                if status != 202 {
                    bail!("ingest answered {status}");
                }
            }
        }
    }
    let sent = started.elapsed();
    if let Some(floor) = floor {
        // Bounded as the ingest's own wait below: a lost event fails the
        // bench rather than hanging it.
        let limit = Duration::from_secs(600).saturating_sub(started.elapsed());
        tokio::time::timeout(limit, floor)
            .await
            .with_context(|| {
                format!(
                    "not all {} events were delivered within 10 minutes",
                    args.events
                )
            })???;
        let elapsed = started.elapsed();
        let copy_rows_per_sec = copy_rate(&pool, args).await?;
        pool.close().await;
        let events_per_sec = args.events as f64 / elapsed.as_secs_f64();
        println!(
            "{} events through JetStream alone (published, delivered, acked; nothing stored): \
{events_per_sec:.0} events/s first publish -> last ack",
            args.events
        );
        println!(
            "plain COPY of the same rows (best of {COPY_ATTEMPTS}): {copy_rows_per_sec:.0} rows/s; ratio {:.2}",
            events_per_sec / copy_rows_per_sec
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "ingest-floor",
                "events": args.events,
                "runs": args.runs,
                "send_s": round(sent.as_secs_f64()),
                "elapsed_s": round(elapsed.as_secs_f64()),
                "events_per_sec": round(events_per_sec),
                "copy_rows_per_sec": round(copy_rows_per_sec),
                "ratio_to_copy": round(events_per_sec / copy_rows_per_sec),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Done when event ingest has committed every event: its counter of
    // events stored moves after each commit. Reading it costs the database
    // nothing; counting the table every few milliseconds would scan it over
    // and over while it is being filled, and asking NATS for the consumer's
    // ack floor this often made nats-server 2.9 forget ingest's pull
    // requests (see `persister::Watermark`).
    loop {
        let stored = counter(&http, &metrics_url, "corral_events_ingested_total").await?;
        if stored >= args.events as u64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {stored} of {} events stored after 10 minutes",
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let elapsed = started.elapsed();
    let unanswered = counter(&http, &metrics_url, "corral_event_fetch_unanswered_total").await?;
    reading.cancel();
    let mut page_ms = Vec::new();
    for reader in readers {
        page_ms.extend(reader.await??);
    }
    let (page_p50, page_p99) = (
        super::percentile(&mut page_ms, 0.50),
        super::percentile(&mut page_ms, 0.99),
    );
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM sandbox_events")
        .fetch_one(&pool)
        .await?;
    if stored as usize != args.events {
        bail!(
            "{stored} rows in the table once event ingest counted {} events stored",
            args.events
        );
    }
    let events_per_sec = args.events as f64 / elapsed.as_secs_f64();
    let (lag_p50, lag_p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), percentile_cont(0.99) WITHIN GROUP (ORDER BY lag)
         FROM (SELECT extract(epoch FROM ingested_at - at) * 1000 AS lag FROM sandbox_events) l",
    )
    .fetch_one(&pool)
    .await?;

    let copy_rows_per_sec = copy_rate(&pool, args).await?;
    pool.close().await;

    let figures = serde_json::json!({
        "bench": "ingest",
        "via": format!("{:?}", args.via).to_lowercase(),
        "events": args.events,
        "runs": args.runs,
        "rate": args.rate,
        "send_s": round(sent.as_secs_f64()),
        "elapsed_s": round(elapsed.as_secs_f64()),
        "events_per_sec": round(events_per_sec),
        "lag_p50_ms": round(lag_p50),
        "lag_p99_ms": round(lag_p99),
        "copy_rows_per_sec": round(copy_rows_per_sec),
        "ratio_to_copy": round(events_per_sec / copy_rows_per_sec),
        "fetches_unanswered": unanswered,
        "readers": args.readers,
        "pages_read": page_ms.len(),
        "page_p50_ms": round(page_p50),
        "page_p99_ms": round(page_p99),
    });
    println!(
        "{} events via {:?}: {events_per_sec:.0} events/s first publish -> last commit ({} ms)",
        args.events,
        args.via,
        round(ms(elapsed))
    );
    println!("ingest lag (accepted -> committed): p50 {lag_p50:.1} ms, p99 {lag_p99:.1} ms");
    println!(
        "plain COPY of the same rows (best of {COPY_ATTEMPTS}): {copy_rows_per_sec:.0} rows/s; ratio {:.2}",
        events_per_sec / copy_rows_per_sec
    );
    if args.readers > 0 {
        println!(
            "{} readers read {} pages meanwhile: p50 {page_p50:.1} ms, p99 {page_p99:.1} ms",
            args.readers,
            page_ms.len(),
        );
    }
    println!("{figures}");
    Ok(ExitCode::SUCCESS)
}

/// Rows per second of a plain COPY of the bench's events into a fresh table
/// shaped like `sandbox_events`, best of [`COPY_ATTEMPTS`]: right after the
/// ingest the database may still be writing it out (checkpoint, autovacuum),
/// and the best COPY makes the ratio the harder one to meet, never the
/// easier.
async fn copy_rate(pool: &sqlx::PgPool, args: &IngestArgs) -> anyhow::Result<f64> {
    let mut text = String::with_capacity(args.events * 160);
    let at = chrono::Utc::now().to_rfc3339();
    for i in 0..args.events {
        text.push_str(&format!(
            "bench-{i}\trun-{}\t{}\t{}\tagent.tool_use\t{at}\t{{\"tool\": \"Bash\", \"input\": {{\"command\": \"cargo test --workspace\"}}, \"tool_use_id\": \"t{i}\"}}\tf\t{at}\n",
            i % args.runs,
            i + 1,
            i / args.runs + 1
        ));
    }
    let mut best: f64 = 0.0;
    for attempt in 0..COPY_ATTEMPTS {
        let table = format!("copy_bench_{attempt}");
        sqlx::query(&format!(
            "CREATE TABLE {table} (LIKE sandbox_events INCLUDING ALL)"
        ))
        .execute(pool)
        .await?;
        let mut conn = pool.acquire().await?;
        let copy_started = Instant::now();
        let mut copy = conn
            .copy_in_raw(&format!("COPY {table} (event_id, run_id, stream_seq, seq, kind, at, payload, truncated, ingested_at) FROM STDIN"))
            .await?;
        copy.send(text.as_bytes()).await?;
        copy.finish().await?;
        let rate = args.events as f64 / copy_started.elapsed().as_secs_f64();
        best = best.max(rate);
        drop(conn);
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(pool)
            .await?;
    }
    Ok(best)
}

/// `--floor`: a consumer shaped like event ingest's (explicit acks, the
/// same batches and ack window) in place of its own, which acks each event
/// as it comes and stores nothing; ends when `events` are acked.
async fn consume_alone(
    stack: &Stack,
    events: usize,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    const BATCH: usize = 1000;
    let js = stack.client.jetstream().clone();
    let subjects = stack.client.subjects();
    let stream = js.get_stream(subjects.events_stream()).await?;
    // Event ingest's consumer would keep its share of the stream's work.
    let _ = stream
        .delete_consumer(corral_event_ingest::persister::CONSUMER)
        .await;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench-floor".into()),
            filter_subject: subjects.events_all(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (BATCH * 6) as i64,
            ..Default::default()
        })
        .await?;
    Ok(tokio::spawn(async move {
        let mut acked = 0;
        while acked < events {
            let mut messages = consumer
                .fetch()
                .max_messages(BATCH)
                .expires(Duration::from_millis(500))
                .messages()
                .await?;
            while let Some(message) = messages.next().await {
                let message = message.map_err(|err| anyhow::anyhow!("{err}"))?;
                message
                    .ack()
                    .await
                    .map_err(|err| anyhow::anyhow!("{err}"))?;
                acked += 1;
            }
        }
        anyhow::Ok(())
    }))
}
