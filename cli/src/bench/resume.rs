//! `corral bench resume`: how fast kept sessions pause, resume, and answer a
//! continue while paused, against the stack `corral up` runs (local
//! provider, same machine: the bench reads the sandboxes' processes).
//!
//! Each session's first turn leaves a background process behind (as a dev
//! server would). Pause is timed from publishing the command until that
//! process is stopped (state `T` in /proc), resume until it runs again, and
//! continue-on-paused from publishing the continue until the turn's first
//! output line arrives.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_client::Client;
use corral_proto::v1::{
    AgentEvent, ContinueCommand, RunCommand, RunSpec, RunState, SessionCommand, StopCommand,
    session_command,
};
use corral_provider::LocalProvider;
use futures::StreamExt;
use prost::Message;
use tokio::sync::Semaphore;

use super::{ms, percentile, round};
use crate::commands::Global;

#[derive(clap::Args)]
#[command(
    after_help = "Needs the stack `corral up` runs on this machine (local provider) and its CORRAL_HOME. \
Prints p50/p99 of pause, resume and continue-on-paused to first output; the last line is JSON with \
pause_p99_ms, resume_p99_ms and continue_paused_p99_ms.\n\nExample:\n  corral up &\n  corral bench resume --sessions 50"
)]
pub struct ResumeArgs {
    /// Kept sessions to create and measure.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Sessions measured at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// The sandbox directory of the stack [env: CORRAL_HOME; default ~/.corral].
    #[arg(long, env = "CORRAL_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
}

const LIMIT: Duration = Duration::from_secs(30);

/// Polls `check` every millisecond until it holds; the time it took.
async fn until(
    what: &str,
    started: Instant,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<f64> {
    loop {
        if check() {
            return Ok(ms(started.elapsed()));
        }
        if started.elapsed() > LIMIT {
            bail!("{what} did not happen within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn stopped(pid: i32) -> bool {
    corral_provider::local::is_paused(pid)
}

async fn get_until(
    client: &Client,
    run_id: &str,
    what: &str,
    check: impl Fn(&corral_proto::v1::Run) -> bool,
) -> anyhow::Result<corral_proto::v1::Run> {
    let started = Instant::now();
    loop {
        let run = client.get(run_id).await?;
        if check(&run) {
            return Ok(run);
        }
        if run.state().is_terminal() {
            bail!(
                "run {run_id} ended ({}: {}) before {what}",
                run.state().name(),
                run.reason
            );
        }
        if started.elapsed() > LIMIT {
            bail!("run {run_id}: {what} did not happen within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn session_command(run_id: &str, action: session_command::Action) -> SessionCommand {
    SessionCommand {
        run_id: run_id.to_owned(),
        action: action as i32,
        requested_by: "bench".into(),
        requested_at_ms: corral_common::now_ms(),
    }
}

#[derive(Default)]
struct Samples {
    pause: Vec<f64>,
    resume: Vec<f64>,
    continue_paused: Vec<f64>,
}

/// One session: pause, resume, pause again, then continue while paused.
async fn measure(client: &Client, home: &LocalProvider, run_id: &str) -> anyhow::Result<[f64; 3]> {
    let run = get_until(client, run_id, "first turn idle", |r| {
        r.state() == RunState::Idle && r.owner.is_empty()
    })
    .await?;
    let pid_file = home.work_dir(&run.sandbox_id).join("bg.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| {
            format!(
                "{} (is --home the stack's CORRAL_HOME?)",
                pid_file.display()
            )
        })?
        .trim()
        .parse()
        .context("bg.pid")?;
    // The pid the agent saw is its sandbox's; /proc here needs this machine's.
    let pid = home
        .host_pid(&run.sandbox_id, pid)
        .with_context(|| format!("run {run_id}: background process {pid} is not running"))?;
    let released =
        |state: RunState| move |r: &corral_proto::v1::Run| r.state() == state && r.owner.is_empty();

    let started = Instant::now();
    client
        .session(&session_command(run_id, session_command::Action::Pause))
        .await?;
    let pause = until("pause", started, || stopped(pid)).await?;
    get_until(client, run_id, "paused", released(RunState::Paused)).await?;

    let started = Instant::now();
    client
        .session(&session_command(run_id, session_command::Action::Resume))
        .await?;
    let resume = until("resume", started, || !stopped(pid)).await?;
    get_until(client, run_id, "idle", released(RunState::Idle)).await?;

    client
        .session(&session_command(run_id, session_command::Action::Pause))
        .await?;
    get_until(client, run_id, "paused again", released(RunState::Paused)).await?;
    let mut output = client
        .nats()
        .subscribe(client.subjects().events(run_id, "agent.output"))
        .await
        .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    client.nats().flush().await?;
    let started = Instant::now();
    let command = ContinueCommand {
        run_id: run_id.to_owned(),
        argv: vec!["echo".into(), "resumed".into()],
        requested_by: "bench".into(),
        submitted_at_ms: corral_common::now_ms(),
    };
    client.continue_run(&command).await?;
    let first = tokio::time::timeout(LIMIT, async {
        while let Some(message) = output.next().await {
            if AgentEvent::decode(message.payload).is_ok() {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(first, Ok(true)) {
        bail!("run {run_id}: no output within {LIMIT:?} of the continue");
    }
    let continue_paused = ms(started.elapsed());
    Ok([pause, resume, continue_paused])
}

pub async fn run(global: &Global, args: ResumeArgs) -> anyhow::Result<ExitCode> {
    if args.sessions == 0 || args.concurrency == 0 {
        bail!("--sessions and --concurrency must be positive");
    }
    let client = global.client().await?;
    let home_dir = corral_common::config::corral_home(&args.home.clone().unwrap_or_default());
    let home = Arc::new(LocalProvider::new(
        &home_dir,
        &corral_provider::LocalConfig::default(),
    )?);
    let batch = corral_client::new_run_id();
    let run_ids: Vec<String> = (0..args.sessions)
        .map(|i| format!("resume-{}-{i}", &batch[batch.len() - 12..]))
        .collect();
    eprintln!("starting {} kept sessions", args.sessions);
    for run_id in &run_ids {
        let command = RunCommand {
            run_id: run_id.clone(),
            spec: Some(RunSpec {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "sleep 3600 >/dev/null 2>&1 & echo $! > bg.pid".into(),
                ],
                keep_alive: true,
                labels: [("bench".to_owned(), batch.clone())].into_iter().collect(),
                ..Default::default()
            }),
            requested_by: "bench".into(),
            submitted_at_ms: corral_common::now_ms(),
        };
        client.start_run(&command).await.context("submit")?;
    }

    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = Vec::new();
    for run_id in run_ids.clone() {
        let permit = permits.clone().acquire_owned().await?;
        let (client, home) = (client.clone(), home.clone());
        tasks.push(tokio::spawn(async move {
            let result = measure(&client, &home, &run_id).await;
            drop(permit);
            result
        }));
    }
    let mut samples = Samples::default();
    let mut failures = 0;
    for task in tasks {
        match task.await? {
            Ok([pause, resume, continue_paused]) => {
                samples.pause.push(pause);
                samples.resume.push(resume);
                samples.continue_paused.push(continue_paused);
            }
            Err(err) => {
                failures += 1;
                eprintln!("session failed: {}", crate::report(&err));
            }
        }
    }
    // Leave nothing behind: every session is stopped (its sandbox killed).
    for run_id in &run_ids {
        let stop = StopCommand {
            run_id: run_id.clone(),
            reason: "bench over".into(),
            requested_by: "bench".into(),
            requested_at_ms: corral_common::now_ms(),
        };
        let _ = client.stop(&stop).await;
    }

    let figures = serde_json::json!({
        "bench": "resume",
        "sessions": args.sessions,
        "measured": samples.pause.len(),
        "failed": failures,
        "pause_p50_ms": round(percentile(&mut samples.pause, 0.50)),
        "pause_p99_ms": round(percentile(&mut samples.pause, 0.99)),
        "resume_p50_ms": round(percentile(&mut samples.resume, 0.50)),
        "resume_p99_ms": round(percentile(&mut samples.resume, 0.99)),
        "continue_paused_p50_ms": round(percentile(&mut samples.continue_paused, 0.50)),
        "continue_paused_p99_ms": round(percentile(&mut samples.continue_paused, 0.99)),
    });
    println!(
        "sessions measured              {}/{}",
        samples.pause.len(),
        args.sessions
    );
    for (name, key) in [
        ("pause (command -> frozen)", "pause"),
        ("resume (command -> thawed)", "resume"),
        ("continue on paused -> output", "continue_paused"),
    ] {
        println!(
            "{name:<30} p50 {} ms, p99 {} ms",
            figures[format!("{key}_p50_ms")],
            figures[format!("{key}_p99_ms")]
        );
    }
    println!("{figures}");
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
