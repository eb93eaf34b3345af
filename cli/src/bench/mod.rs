//! `corral bench`: measurements against a running deployment (`corral up`).
//! Each prints its figures and, as its last line, one JSON object.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_proto::v1::{LifecycleEvent, RunCommand, RunSpec, RunState};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{Semaphore, oneshot};

use crate::commands::Global;

mod cpu;
mod ingest;
mod isolation;
mod outage;
mod reaper;
mod resume;
mod scale;
mod stack;
mod stop;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Throughput and latency of whole runs (agent `true` by default) against the stack `corral up` runs.
    Runs(RunsArgs),
    /// Stop latency and spawner memory per sandbox; starts its own tracker and spawner processes.
    Stop(stop::StopArgs),
    /// Events/s and lag of event ingest against a plain COPY; self-contained.
    Ingest(ingest::IngestArgs),
    /// Sweep cost over a large history and deadline-to-kill with a frozen owner; self-contained.
    Reaper(reaper::ReaperArgs),
    /// Pause, resume and continue-on-paused latency of kept sessions against the stack `corral up` runs.
    Resume(resume::ResumeArgs),
    /// What a local sandbox's namespaces and control groups cost at start; self-contained.
    Isolation(isolation::IsolationArgs),
    /// Runs through PostgreSQL, tracker, NATS and ingest outages: what was lost; self-contained.
    Outage(outage::OutageArgs),
    /// Runs/s and stop p99 by spawner and tracker processes, on one NATS server and on a 3-node cluster; self-contained.
    Scale(scale::ScaleArgs),
}

#[derive(clap::Args)]
#[command(
    after_help = "Prints submit->accepted, submit->running and submit->done percentiles and \
runs/s; the last line is JSON with runs_per_sec, submit_to_accepted_p50_ms, \
submit_to_accepted_p99_ms, submit_to_running_p50_ms, submit_to_running_p99_ms, \
submit_to_done_p99_ms, and (on Linux) machine_cpu_ms_per_run and machine_busy_pct: the CPU \
time every process on the machine spent while the runs ran (/proc/stat), per completed run, \
and how busy the cores were. It counts everything, the bench itself included, so read it \
on a machine doing nothing else. Near 100% busy, runs/s is the cores' time divided by the \
CPU per run: only a cheaper run raises it, not a shorter wait.\n\n\
Example:\n  corral up &\n  corral bench runs --count 2000 --concurrency 64"
)]
pub struct RunsArgs {
    /// Runs to submit.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Runs in flight at once (submitted, not yet ended).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 60)]
    run_timeout: u64,
    /// The agent command (default: true).
    #[arg(last = true, value_name = "COMMAND")]
    argv: Vec<String>,
}

pub async fn bench(global: &Global, bench: Bench) -> anyhow::Result<ExitCode> {
    match bench {
        Bench::Runs(args) => runs(global, args).await,
        Bench::Stop(args) => stop::run(global, args).await,
        Bench::Reaper(args) => reaper::run(global, args).await,
        Bench::Ingest(args) => ingest::run(global, args).await,
        Bench::Resume(args) => resume::run(global, args).await,
        Bench::Isolation(args) => isolation::run(args).await,
        Bench::Outage(args) => outage::run(args).await,
        Bench::Scale(args) => scale::run(global, args).await,
    }
}

#[derive(Default)]
struct Timing {
    submitted: Option<Instant>,
    /// When `start_run` returned: the record exists and the command is on
    /// the work queue.
    accepted: Option<Instant>,
    running: Option<Instant>,
    done: Option<(Instant, RunState)>,
    notify: Option<oneshot::Sender<()>>,
}

async fn runs(global: &Global, args: RunsArgs) -> anyhow::Result<ExitCode> {
    if args.count == 0 || args.concurrency == 0 {
        bail!("--count and --concurrency must be positive");
    }
    let client = global.client().await?;
    let figures = measure_runs(&client, &args).await?;
    println!(
        "runs completed        {}/{} in {:.2} s",
        figures["completed"], args.count, figures["elapsed_s"]
    );
    println!(
        "throughput            {:.1} runs/s",
        figures["runs_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "submit -> accepted    p50 {} ms, p99 {} ms",
        figures["submit_to_accepted_p50_ms"], figures["submit_to_accepted_p99_ms"]
    );
    println!(
        "submit -> running     p50 {} ms, p99 {} ms",
        figures["submit_to_running_p50_ms"], figures["submit_to_running_p99_ms"]
    );
    println!(
        "submit -> done        p50 {} ms, p99 {} ms",
        figures["submit_to_done_p50_ms"], figures["submit_to_done_p99_ms"]
    );
    if let Some(per_run) = figures.get("machine_cpu_ms_per_run") {
        println!(
            "machine CPU           {per_run} ms per completed run ({}% of all cores busy)",
            figures["machine_busy_pct"]
        );
    }
    println!("{figures}");
    Ok(
        if figures["completed"].as_u64() == Some(args.count as u64) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

/// Submits `args.count` runs, `args.concurrency` in flight at once, and
/// times each from submit to running and to its end, on the lifecycle
/// events; returns the figures (JSON, as `bench runs` prints them).
async fn measure_runs(
    client: &corral_client::Client,
    args: &RunsArgs,
) -> anyhow::Result<serde_json::Value> {
    let argv = if args.argv.is_empty() {
        vec!["true".to_owned()]
    } else {
        args.argv.clone()
    };
    let timings: Arc<Mutex<HashMap<String, Timing>>> = Arc::default();

    let mut lifecycle = client
        .nats()
        .subscribe(client.subjects().lifecycle_all())
        .await
        .context("cannot subscribe to lifecycle events")?;
    client.nats().flush().await?;
    let listener = {
        let timings = timings.clone();
        tokio::spawn(async move {
            while let Some(message) = lifecycle.next().await {
                let Ok(event) = LifecycleEvent::decode(message.payload) else {
                    continue;
                };
                let now = Instant::now();
                let to = RunState::try_from(event.to).unwrap_or(RunState::Unspecified);
                let Ok(mut timings) = timings.lock() else {
                    return;
                };
                let Some(timing) = timings.get_mut(&event.run_id) else {
                    continue;
                };
                if to == RunState::Running && timing.running.is_none() {
                    timing.running = Some(now);
                }
                if to.is_terminal() && timing.done.is_none() {
                    timing.done = Some((now, to));
                    if let Some(notify) = timing.notify.take() {
                        let _ = notify.send(());
                    }
                }
            }
        })
    };

    eprintln!(
        "submitting {} runs of {:?}, {} at a time",
        args.count, argv, args.concurrency
    );
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let batch = corral_client::new_run_id();
    let started = Instant::now();
    let cpu_before = cpu::CpuTimes::now();
    let mut tasks = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let permit = permits.clone().acquire_owned().await?;
        let run_id = format!("bench-{}-{i}", &batch[batch.len() - 12..]);
        let (tx, rx) = oneshot::channel();
        let command = RunCommand {
            run_id: run_id.clone(),
            spec: Some(RunSpec {
                argv: argv.clone(),
                labels: [("bench".to_owned(), batch.clone())].into_iter().collect(),
                ..Default::default()
            }),
            requested_by: "bench".into(),
            submitted_at_ms: corral_common::now_ms(),
        };
        timings
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(
                run_id.clone(),
                Timing {
                    submitted: Some(Instant::now()),
                    notify: Some(tx),
                    ..Default::default()
                },
            );
        let client = client.clone();
        let limit = Duration::from_secs(args.run_timeout);
        let timings = timings.clone();
        tasks.push(tokio::spawn(async move {
            let result = match client.start_run(&command).await {
                Ok(_) => {
                    if let Ok(mut timings) = timings.lock()
                        && let Some(timing) = timings.get_mut(&run_id)
                    {
                        timing.accepted = Some(Instant::now());
                    }
                    tokio::time::timeout(limit, rx).await.is_ok()
                }
                Err(err) => {
                    eprintln!("submit of {run_id} failed: {err}");
                    false
                }
            };
            drop(permit);
            result
        }));
    }
    let mut ended = 0;
    for task in tasks {
        if task.await.unwrap_or(false) {
            ended += 1;
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_before
        .zip(cpu::CpuTimes::now())
        .map(|(before, after)| after.busy_since(&before));
    listener.abort();

    let timings = timings.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut to_accepted = Vec::new();
    let mut to_running = Vec::new();
    let mut to_done = Vec::new();
    let mut completed = 0;
    for timing in timings.values() {
        let Some(submitted) = timing.submitted else {
            continue;
        };
        if let Some(accepted) = timing.accepted {
            to_accepted.push(ms(accepted - submitted));
        }
        if let Some(running) = timing.running {
            to_running.push(ms(running - submitted));
        }
        if let Some((done, state)) = timing.done {
            to_done.push(ms(done - submitted));
            if state == RunState::Completed {
                completed += 1;
            }
        }
    }
    let runs_per_sec = completed as f64 / elapsed.as_secs_f64();
    let mut figures = serde_json::json!({
        "bench": "runs",
        "runs": args.count,
        "concurrency": args.concurrency,
        "completed": completed,
        "ended": ended,
        "elapsed_s": round(elapsed.as_secs_f64()),
        "runs_per_sec": round(runs_per_sec),
        "submit_to_accepted_p50_ms": round(percentile(&mut to_accepted, 0.50)),
        "submit_to_accepted_p99_ms": round(percentile(&mut to_accepted, 0.99)),
        "submit_to_running_p50_ms": round(percentile(&mut to_running, 0.50)),
        "submit_to_running_p99_ms": round(percentile(&mut to_running, 0.99)),
        "submit_to_done_p50_ms": round(percentile(&mut to_done, 0.50)),
        "submit_to_done_p99_ms": round(percentile(&mut to_done, 0.99)),
    });
    if let Some((busy_ms, busy_pct)) = cpu
        && completed > 0
    {
        figures["machine_cpu_ms_per_run"] = round(busy_ms / completed as f64).into();
        figures["machine_busy_pct"] = round(busy_pct).into();
    }
    Ok(figures)
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Nearest-rank percentile; 0 for no samples.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}
