//! `corral bench stop`: N long-running sandboxes over S spawner processes,
//! all stopped at once from this process; latency from each StopCommand's
//! publish to a bare subscriber hearing it (NATS delivery alone), to its
//! process group being gone, and to the `stopped` lifecycle event; spawner
//! memory per owned sandbox. `--floor` times the same burst with no NATS
//! and no owner: the machine's own cost of ending the agents.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_proto::v1::{LifecycleEvent, RunCommand, RunSpec, RunState, StopCommand};
use futures::StreamExt;
use prost::Message;
use tokio::sync::Semaphore;

use super::stack::{Stack, exited, rss_kib};
use super::{ms, percentile, round};
use crate::commands::Global;

#[derive(clap::Args)]
#[command(
    after_help = "Needs NATS_URL and DATABASE_URL; starts its own tracker and spawners under a \
fresh subject prefix and removes them after.\n\nWith --floor it prints what the machine alone \
needs for the same burst: the spawners frozen, each agent's command signalled by the bench, timed \
to its processes being gone (the command and its corral-enter wrapper). No NATS delivery, owner \
work or records are in that figure; compare it with the burst's p99 from a run without \
--floor.\n\nExamples:\n  corral bench stop --sandboxes 1000 --spawners 2\n  corral bench stop \
--sandboxes 1000 --spawners 2 --floor"
)]
pub struct StopArgs {
    /// Sandboxes to start and stop.
    #[arg(long, default_value_t = 1000)]
    sandboxes: usize,
    /// Spawner processes to spread them over.
    #[arg(long, default_value_t = 2)]
    spawners: usize,
    /// The machine's floor for this burst, not corral's figure: freeze the
    /// spawners (SIGSTOP) and SIGTERM each agent straight from the bench,
    /// with no NATS, no owner and no records in the window.
    #[arg(long)]
    floor: bool,
}

#[derive(Default)]
struct Seen {
    running: HashMap<String, String>,
    stopped: HashMap<String, Instant>,
}

pub async fn run(global: &Global, args: StopArgs) -> anyhow::Result<ExitCode> {
    if args.sandboxes == 0 || args.spawners == 0 {
        bail!("--sandboxes and --spawners must be positive");
    }
    let mut stack = Stack::new(&global.nats_url, "stop").await?;
    let result = measure(&mut stack, &args).await;
    stack.teardown().await;
    result
}

async fn measure(stack: &mut Stack, args: &StopArgs) -> anyhow::Result<ExitCode> {
    stack.spawn("tracker", &[])?;
    stack.wait_for_tracker().await?;
    let per_spawner = args.sandboxes.div_ceil(args.spawners);
    let mut spawners = Vec::new();
    for i in 0..args.spawners {
        let env = [
            ("CORRAL_SPAWNER_ID", format!("bench-spawner-{i}")),
            ("CORRAL_MAX_RUNS", (per_spawner + 8).to_string()),
        ];
        spawners.push(stack.spawn("spawner", &env)?);
    }
    let figures = stop_burst(stack, args.sandboxes, &spawners, args.floor).await?;
    println!(
        "sandboxes stopped        {}/{}",
        figures["gone"], args.sandboxes
    );
    if args.floor {
        println!(
            "signal -> process gone   p50 {} ms, p99 {} ms, max {} ms (the floor: no NATS, no owner)",
            figures["stop_p50_ms"], figures["stop_p99_ms"], figures["stop_max_ms"]
        );
        println!("{figures}");
        return Ok(if figures["gone"].as_u64() == Some(args.sandboxes as u64) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    println!(
        "publish -> heard         p50 {} ms, p99 {} ms (a subscriber of its own)",
        figures["heard_p50_ms"], figures["heard_p99_ms"]
    );
    println!(
        "publish -> process gone  p50 {} ms, p99 {} ms, max {} ms",
        figures["stop_p50_ms"], figures["stop_p99_ms"], figures["stop_max_ms"]
    );
    println!(
        "publish -> stopped event p50 {} ms, p99 {} ms",
        figures["stopped_event_p50_ms"], figures["stopped_event_p99_ms"]
    );
    println!(
        "spawner memory           {} KiB per owned sandbox",
        figures["spawner_rss_kib_per_sandbox"]
    );
    println!("{figures}");
    Ok(if figures["gone"].as_u64() == Some(args.sandboxes as u64) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Starts `sandboxes` sleeping runs on the stack's spawners (`spawners`:
/// their pids), stops them all at once and times each from the stop's
/// publish to its processes being gone and to its `stopped` event;
/// returns the figures (JSON, as `bench stop` prints them).
pub(super) async fn stop_burst(
    stack: &Stack,
    sandboxes_wanted: usize,
    spawners: &[u32],
    floor: bool,
) -> anyhow::Result<serde_json::Value> {
    let args = StopArgs {
        sandboxes: sandboxes_wanted,
        spawners: spawners.len(),
        floor,
    };
    let client = stack.client.clone();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut lifecycle = client
        .nats()
        .subscribe(client.subjects().lifecycle_all())
        .await?;
    client.nats().flush().await?;
    let listener = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = lifecycle.next().await {
                let Ok(event) = LifecycleEvent::decode(message.payload) else {
                    continue;
                };
                let Ok(mut seen) = seen.lock() else { return };
                match RunState::try_from(event.to) {
                    Ok(RunState::Running) => {
                        seen.running.insert(event.run_id, event.sandbox_id);
                    }
                    Ok(RunState::Stopped) => {
                        seen.stopped.insert(event.run_id, Instant::now());
                    }
                    _ => {}
                }
            }
        })
    };
    // Let the spawners connect and settle before the memory baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline: Vec<u64> = spawners
        .iter()
        .map(|pid| rss_kib(*pid).unwrap_or(0))
        .collect();

    eprintln!(
        "starting {} sandboxes over {} spawners",
        args.sandboxes, args.spawners
    );
    let permits = Arc::new(Semaphore::new(64));
    let mut submits = Vec::new();
    for i in 0..args.sandboxes {
        let permit = permits.clone().acquire_owned().await?;
        let client = client.clone();
        let command = RunCommand {
            run_id: format!("{}-{i}", stack.prefix),
            spec: Some(RunSpec {
                argv: vec!["sleep".into(), "3600".into()],
                timeout_secs: 3600,
                idle_timeout_secs: 3600,
                ..Default::default()
            }),
            requested_by: "bench".into(),
            submitted_at_ms: corral_common::now_ms(),
        };
        submits.push(tokio::spawn(async move {
            let result = client.start_run(&command).await;
            drop(permit);
            result
        }));
    }
    for submit in submits {
        submit.await?.context("submit failed")?;
    }
    let started = Instant::now();
    loop {
        let running = seen.lock().map(|s| s.running.len()).unwrap_or(0);
        if running >= args.sandboxes {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!(
                "only {running} of {} sandboxes reached running",
                args.sandboxes
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loaded: Vec<u64> = spawners
        .iter()
        .map(|pid| rss_kib(*pid).unwrap_or(0))
        .collect();
    let grown: u64 = loaded
        .iter()
        .zip(&baseline)
        .map(|(after, before)| after.saturating_sub(*before))
        .sum();
    let rss_per_sandbox = grown as f64 / args.sandboxes as f64;

    // The agents' processes, found once by their sandbox marker.
    let sandboxes: HashMap<String, String> =
        seen.lock().map(|s| s.running.clone()).unwrap_or_default();
    // `running` is announced just before the agent is started: look until
    // every sandbox shows its process.
    let mut pids = pids_by_sandbox();
    let looking = Instant::now();
    while sandboxes.values().any(|id| !pids.contains_key(id))
        && looking.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        pids = pids_by_sandbox();
    }
    let mut waits = Vec::new();
    let gone: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    for (run_id, sandbox_id) in &sandboxes {
        let Some(pids) = pids.get(sandbox_id) else {
            bail!("no process found for sandbox {sandbox_id} of run {run_id}");
        };
        for pid in pids.clone() {
            let gone = gone.clone();
            let run_id = run_id.clone();
            waits.push(tokio::spawn(async move {
                let _ = exited(pid).await;
                if let Ok(mut gone) = gone.lock() {
                    gone.entry(run_id)
                        .and_modify(|t| *t = (*t).max(Instant::now()))
                        .or_insert_with(Instant::now);
                }
            }));
        }
    }
    // pidfds are open before the first stop goes out.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    if floor {
        let figures = signal_directly(spawners, &sandboxes, &pids, waits, gone).await;
        listener.abort();
        return figures;
    }
    let (heard, _listening) = listen_to_stops(stack).await?;
    eprintln!("stopping {} sandboxes", sandboxes.len());
    let js = client.jetstream();
    let mut published = HashMap::new();
    let mut acks = Vec::new();
    for run_id in sandboxes.keys() {
        let stop = StopCommand {
            run_id: run_id.clone(),
            reason: "bench".into(),
            requested_by: "bench".into(),
            requested_at_ms: corral_common::now_ms(),
        };
        published.insert(run_id.clone(), Instant::now());
        acks.push(
            js.publish(
                client.subjects().cmd_stop(run_id),
                stop.encode_to_vec().into(),
            )
            .await?,
        );
    }
    for ack in acks {
        ack.await.context("stop not acknowledged by JetStream")?;
    }
    for wait in waits {
        let _ = tokio::time::timeout(Duration::from_secs(60), wait).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().map(|s| s.stopped.len()).unwrap_or(0) < sandboxes.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    listener.abort();

    let gone = gone.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let heard = heard.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut to_gone = Vec::new();
    let mut to_event = Vec::new();
    let mut to_heard = Vec::new();
    for (run_id, at) in &published {
        if let Some(done) = heard.get(run_id) {
            to_heard.push(ms(done.saturating_duration_since(*at)));
        }
        if let Some(done) = gone.get(run_id) {
            to_gone.push(ms(done.saturating_duration_since(*at)));
        }
        if let Some(done) = seen.stopped.get(run_id) {
            to_event.push(ms(done.saturating_duration_since(*at)));
        }
    }
    let max = to_gone.iter().cloned().fold(0.0, f64::max);
    let figures = serde_json::json!({
        "bench": "stop",
        "sandboxes": args.sandboxes,
        "spawners": args.spawners,
        "gone": to_gone.len(),
        "stopped_events": to_event.len(),
        "stop_p50_ms": round(percentile(&mut to_gone, 0.50)),
        "stop_p99_ms": round(percentile(&mut to_gone, 0.99)),
        "stop_max_ms": round(max),
        "heard_p50_ms": round(percentile(&mut to_heard, 0.50)),
        "heard_p99_ms": round(percentile(&mut to_heard, 0.99)),
        "stopped_event_p50_ms": round(percentile(&mut to_event, 0.50)),
        "stopped_event_p99_ms": round(percentile(&mut to_event, 0.99)),
        "spawner_rss_kib_per_sandbox": round(rss_per_sandbox),
    });
    Ok(figures)
}

/// `--floor`: the spawners frozen, each agent's command gets SIGTERM from
/// here; times from each signal to the run's processes being gone.
async fn signal_directly(
    spawners: &[u32],
    sandboxes: &HashMap<String, String>,
    pids: &HashMap<String, Vec<i32>>,
    waits: Vec<tokio::task::JoinHandle<()>>,
    gone: Arc<Mutex<HashMap<String, Instant>>>,
) -> anyhow::Result<serde_json::Value> {
    let signal = |pid: u32, signal: i32| {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, signal) };
    };
    for pid in spawners {
        signal(*pid, libc::SIGSTOP);
    }
    // Frozen before the first signal: a stopped process is in state T.
    let frozen = Instant::now();
    while !spawners.iter().all(|pid| stopped(*pid)) {
        if frozen.elapsed() > Duration::from_secs(5) {
            for pid in spawners {
                signal(*pid, libc::SIGCONT);
            }
            bail!("the spawners did not stop on SIGSTOP within 5 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The agent's command: the process that is not the wrapper.
    let commands: Vec<(String, i32)> = sandboxes
        .iter()
        .filter_map(|(run_id, sandbox_id)| {
            let command = pids.get(sandbox_id)?.iter().copied().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|comm| comm.trim() != "corral-enter")
                    .unwrap_or(false)
            })?;
            Some((run_id.clone(), command))
        })
        .collect();
    eprintln!(
        "signalling {} agents directly, spawners frozen",
        commands.len()
    );
    let mut signalled = HashMap::new();
    for (run_id, pid) in &commands {
        signalled.insert(run_id.clone(), Instant::now());
        signal(*pid as u32, libc::SIGTERM);
    }
    for wait in waits {
        let _ = tokio::time::timeout(Duration::from_secs(60), wait).await;
    }
    for pid in spawners {
        signal(*pid, libc::SIGCONT);
    }
    let gone = gone.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut to_gone: Vec<f64> = signalled
        .iter()
        .filter_map(|(run_id, at)| Some(ms(gone.get(run_id)?.saturating_duration_since(*at))))
        .collect();
    let max = to_gone.iter().cloned().fold(0.0, f64::max);
    Ok(serde_json::json!({
        "bench": "stop-floor",
        "sandboxes": sandboxes.len(),
        "signalled": commands.len(),
        "gone": to_gone.len(),
        "stop_p50_ms": round(percentile(&mut to_gone, 0.50)),
        "stop_p99_ms": round(percentile(&mut to_gone, 0.99)),
        "stop_max_ms": round(max),
    }))
}

/// Whether a process is stopped by a signal (state `T` in its stat).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command, which is in parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    })
}

/// When each stop reached a subscriber that does nothing else: its own
/// connection, on a thread and runtime of its own, so its figure is NATS
/// delivery alone and the gap to "process gone" is the owner's.
/// The listener ends when the returned sender is dropped.
async fn listen_to_stops(
    stack: &Stack,
) -> anyhow::Result<(Heard, tokio::sync::oneshot::Sender<()>)> {
    let heard: Heard = Arc::default();
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let (url, prefix) = (stack.nats_url.clone(), stack.prefix.clone());
    let record = heard.clone();
    std::thread::Builder::new()
        .name("stop-listener".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready_tx.send(Err(err.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let subscribed = async {
                    let client =
                        corral_client::Client::connect(&url, &prefix, "corral-bench").await?;
                    let stops = client
                        .nats()
                        .subscribe(client.subjects().cmd_stop_all())
                        .await?;
                    client.nats().flush().await?;
                    anyhow::Ok((client, stops))
                };
                let (_client, mut stops) = match subscribed.await {
                    Ok(subscribed) => subscribed,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    let message = tokio::select! {
                        _ = &mut done => return,
                        message = stops.next() => match message {
                            Some(message) => message,
                            None => return,
                        },
                    };
                    let at = Instant::now();
                    let run_id = message.subject.rsplit('.').next().unwrap_or("").to_owned();
                    if let Ok(mut heard) = record.lock() {
                        heard.entry(run_id).or_insert(at);
                    }
                }
            });
        })?;
    ready
        .await
        .context("the stop listener ended before it subscribed")?
        .context("the stop listener could not subscribe")?;
    Ok((heard, done_tx))
}

/// When each run's stop was heard, by run id.
type Heard = Arc<Mutex<HashMap<String, Instant>>>;

/// Process ids by the `CORRAL_SANDBOX_ID` in their environment, in one
/// pass over /proc.
pub fn pids_by_sandbox() -> HashMap<String, Vec<i32>> {
    let mut found: HashMap<String, Vec<i32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for entry in environ.split(|b| *b == 0) {
            if let Some(id) = entry.strip_prefix(b"CORRAL_SANDBOX_ID=") {
                found
                    .entry(String::from_utf8_lossy(id).into_owned())
                    .or_default()
                    .push(pid);
            }
        }
    }
    found
}
