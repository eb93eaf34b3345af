//! `corral bench outage`: nothing lost when corral's own parts fail. A
//! self-contained deployment — its own nats-server (JetStream, file
//! storage), its own PostgreSQL (initdb on a free port) and the services as
//! separate `corral serve` processes — runs agents that print numbered lines
//! while, on a fixed timeline, PostgreSQL stops for 20 s, the tracker is
//! SIGKILLed and started again 10 s later, nats-server restarts (down 5 s)
//! and an ingest is SIGKILLed. Then it counts what was lost.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_proto::v1::{LifecycleEvent, RunCommand, RunSpec};
use prost::Message;

use super::stack::Stack;

#[derive(clap::Args)]
#[command(
    after_help = "Needs nats-server and PostgreSQL's server binaries (initdb, pg_ctl \
under /usr/lib/postgresql/<version>/bin); as root it runs them as the postgres user.\n\n\
The last line is JSON with runs_submitted, runs_completed, runs_dead_lettered, runs_owner_lost, \
runs_wrong_outcome, lifecycle_missing, lifecycle_duplicates, events_lost, events_duplicated. \
The target: every run completed and every other figure 0.\n\n\
Example:\n  corral bench outage --runs 300 --concurrency 32"
)]
pub struct OutageArgs {
    /// Runs to submit (spread over the fault timeline, about a minute).
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Runs submitted but not yet ended at most.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Lines each agent prints (its events).
    #[arg(long, default_value_t = 5)]
    lines: usize,
    /// Give up waiting for the runs this long after the last submit, seconds.
    #[arg(long, default_value_t = 240)]
    settle_timeout: u64,
}

pub async fn run(args: OutageArgs) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.concurrency == 0 {
        bail!("--runs and --concurrency must be positive");
    }
    let dir = std::env::temp_dir().join(format!(
        "corral-outage-{}",
        corral_client::new_run_id().replace('-', "")
    ));
    std::fs::create_dir_all(&dir)?;
    let mut nats = PrivateNats::start(&dir)?;
    let postgres = PrivatePostgres::start(&dir)?;
    let result = measure(&args, &mut nats, &postgres).await;
    drop(postgres);
    nats.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(
    args: &OutageArgs,
    nats: &mut PrivateNats,
    postgres: &PrivatePostgres,
) -> anyhow::Result<ExitCode> {
    let mut stack = Stack::with(&nats.url(), &postgres.url(), "outage").await?;
    let isolation = if unsafe { libc::geteuid() } == 0 {
        "namespaces"
    } else {
        "none"
    };
    let secret = format!("{:032x}", rand::random::<u128>());
    let spawner_env = [
        ("CORRAL_LOCAL__ISOLATION", isolation.to_owned()),
        ("CORRAL_HEARTBEAT_MS", "500".to_owned()),
        ("CORRAL_TOKEN_SECRET", secret.clone()),
    ];
    let reaper_env = [
        ("CORRAL_SWEEP_PERIOD_MS", "1000".to_owned()),
        ("CORRAL_OWNER_TIMEOUT_MS", "5000".to_owned()),
    ];
    let ingest_env = [
        ("CORRAL_LISTEN", "127.0.0.1:0".to_owned()),
        ("CORRAL_TOKEN_SECRET", secret),
    ];
    let tracker = stack.spawn("tracker", &[])?;
    stack.wait_for_tracker().await?;
    stack.spawn("spawner", &spawner_env)?;
    stack.spawn("reaper", &reaper_env)?;
    let ingest = stack.spawn("event-ingest", &ingest_env)?;
    eprintln!(
        "outage bench: {} runs, {} in flight at most, prefix {}",
        args.runs, args.concurrency, stack.prefix
    );

    let script = format!(
        "i=1; while [ $i -le {} ]; do echo line-$i; i=$((i+1)); sleep 0.05; done",
        args.lines
    );
    let started = Instant::now();
    let spread = TIMELINE.as_secs_f64() / args.runs as f64;
    let mut chaos = Chaos {
        done: HashSet::new(),
        tracker,
        ingest,
        ingest_env: ingest_env.to_vec(),
    };
    let mut submitted: Vec<String> = Vec::new();
    for i in 0..args.runs {
        chaos
            .step(started.elapsed(), &mut stack, nats, postgres)
            .await?;
        let command = RunCommand {
            run_id: corral_client::new_run_id(),
            spec: Some(RunSpec {
                argv: vec!["sh".into(), "-c".into(), script.clone()],
                ..Default::default()
            }),
            requested_by: "bench-outage".into(),
            submitted_at_ms: corral_common::now_ms(),
        };
        // Published straight on the command stream, as a platform does; a
        // NATS that is away is waited for (the run counts once published).
        while stack.client.publish_run(&command).await.is_err() {
            chaos
                .step(started.elapsed(), &mut stack, nats, postgres)
                .await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        submitted.push(command.run_id.clone());
        let next = Duration::from_secs_f64(spread * (i + 1) as f64);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        wait_for_room(&stack, &submitted, args.concurrency).await;
    }
    // The rest of the timeline, whatever the number of runs.
    while started.elapsed() <= TIMELINE {
        chaos
            .step(started.elapsed(), &mut stack, nats, postgres)
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Settle: every run ended (or the timeout).
    let deadline = Instant::now() + Duration::from_secs(args.settle_timeout);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&postgres.database_url())
        .await
        .context("cannot reach the benchmark's PostgreSQL")?;
    loop {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs
             WHERE state NOT IN ('completed', 'failed', 'stopped', 'timed_out')",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(i64::MAX);
        let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        let dead_lettered = count_dead_letters(&stack).await;
        if (live == 0 && recorded as usize + dead_lettered >= submitted.len())
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Events settle after their runs.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let report = report(&stack, &pool, &submitted, args.lines).await?;
    println!("{report}");
    pool.close().await;
    stack.teardown().await;
    Ok(ExitCode::SUCCESS)
}

/// How long the fault timeline lasts (the last fault is at 55 s).
const TIMELINE: Duration = Duration::from_secs(60);

/// The fault timeline and the processes it kills.
struct Chaos {
    done: HashSet<u64>,
    tracker: u32,
    ingest: u32,
    ingest_env: Vec<(&'static str, String)>,
}

impl Chaos {
    /// Takes every step of the timeline that `at` has passed, once each.
    async fn step(
        &mut self,
        at: Duration,
        stack: &mut Stack,
        nats: &mut PrivateNats,
        postgres: &PrivatePostgres,
    ) -> anyhow::Result<()> {
        const STEPS: [(u64, &str); 7] = [
            (5, "stop PostgreSQL for 20 s"),
            (25, "start PostgreSQL"),
            (30, "SIGKILL the tracker"),
            (40, "start the tracker again"),
            (45, "stop nats-server for 5 s"),
            (50, "start nats-server"),
            (55, "SIGKILL an ingest and start another"),
        ];
        for (secs, what) in STEPS {
            if at < Duration::from_secs(secs) || !self.done.insert(secs) {
                continue;
            }
            eprintln!("  t={:>4.1}s  {what}", at.as_secs_f64());
            match secs {
                5 => postgres.stop()?,
                25 => postgres.start_again()?,
                30 => kill(self.tracker),
                40 => self.tracker = stack.spawn("tracker", &[])?,
                45 => nats.stop(),
                50 => nats.start_again()?,
                _ => {
                    kill(self.ingest);
                    self.ingest = stack.spawn("event-ingest", &self.ingest_env)?;
                }
            }
        }
        Ok(())
    }
}

fn kill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Waits (a little) while `limit` runs are submitted and not yet ended, as
/// far as the tracker can say; an outage does not stop the submissions.
async fn wait_for_room(stack: &Stack, submitted: &[String], limit: usize) {
    for _ in 0..20 {
        let request = corral_proto::v1::ListRunsRequest {
            states: corral_proto::v1::RunState::ALL
                .iter()
                .filter(|s| !s.is_terminal())
                .map(|s| *s as i32)
                .collect(),
            limit: (limit + 1) as u32,
            ..Default::default()
        };
        match stack.client.list(&request).await {
            Ok(live) if live.len() < limit || submitted.len() < limit => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return,
        }
    }
}

async fn count_dead_letters(stack: &Stack) -> usize {
    let subjects = stack.client.subjects();
    stream_messages(stack, &subjects.dlq_stream(), &subjects.dlq("cmd"))
        .await
        .len()
}

/// Every message of `stream` on `subject` (exactly), with its headers.
async fn stream_messages(
    stack: &Stack,
    stream: &str,
    subject: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let js = stack.client.jetstream();
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let Ok(info) = stream.info().await.map(|i| i.state.clone()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if info.messages == 0 {
        return found;
    }
    for seq in info.first_sequence..=info.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await
            && (subject.is_empty() || message.subject.as_str() == subject)
        {
            found.push(message);
        }
    }
    found
}

async fn report(
    stack: &Stack,
    pool: &sqlx::PgPool,
    submitted: &[String],
    lines: usize,
) -> anyhow::Result<serde_json::Value> {
    let outcomes: Vec<(String, String, String, Option<i32>)> =
        sqlx::query_as("SELECT run_id, state, reason, exit_code FROM runs WHERE run_id = ANY($1)")
            .bind(submitted)
            .fetch_all(pool)
            .await?;
    let completed = outcomes
        .iter()
        .filter(|(_, state, _, code)| state == "completed" && *code == Some(0))
        .count();
    let owner_lost = outcomes
        .iter()
        .filter(|(_, _, reason, _)| reason == "owner_lost")
        .count();
    let dead_lettered = count_dead_letters(stack).await;
    // Not completed, not dead-lettered: recorded with another outcome, or
    // not recorded at all.
    let wrong = submitted.len() - completed.min(submitted.len());
    let wrong = wrong.saturating_sub(dead_lettered);
    // What the wrong ones were, to say why.
    let mut why: HashMap<String, usize> = HashMap::new();
    for (_, state, reason, code) in &outcomes {
        if !(state == "completed" && *code == Some(0)) {
            *why.entry(format!("{state}: {reason}")).or_default() += 1;
        }
    }
    let unrecorded = submitted.len().saturating_sub(outcomes.len());
    if unrecorded > 0 {
        why.insert("not recorded".into(), unrecorded);
    }

    // The lifecycle stream against run_transitions.
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT run_id, version FROM run_transitions")
            .fetch_all(pool)
            .await?;
    let expected: HashSet<(String, i64)> = rows
        .into_iter()
        .filter_map(|(run, version)| Some((run, version?)))
        .collect();
    let subjects = stack.client.subjects();
    let mut announced: HashMap<(String, i64), usize> = HashMap::new();
    for message in stream_messages(stack, &subjects.lifecycle_stream(), "").await {
        if let Ok(event) = LifecycleEvent::decode(message.payload.clone()) {
            *announced
                .entry((event.run_id, event.version as i64))
                .or_default() += 1;
        }
    }
    let lifecycle_missing = expected
        .iter()
        .filter(|key| !announced.contains_key(*key))
        .count();
    let lifecycle_duplicates: usize = announced.values().map(|n| n - 1).sum();

    // Agent output: each completed run printed `lines` lines, stored once.
    let stored: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT run_id, payload->>'line', count(*) FROM sandbox_events
         WHERE kind = 'agent.output' AND run_id = ANY($1) GROUP BY 1, 2",
    )
    .bind(submitted)
    .fetch_all(pool)
    .await?;
    let mut per_run: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut events_duplicated = 0usize;
    for (run, line, count) in &stored {
        per_run.entry(run).or_default().insert(line);
        events_duplicated += (*count as usize).saturating_sub(1);
    }
    let events_lost: usize = outcomes
        .iter()
        .filter(|(_, state, _, code)| state == "completed" && *code == Some(0))
        .map(|(run, ..)| {
            let got = per_run.get(run.as_str());
            (1..=lines)
                .filter(|i| !got.is_some_and(|g| g.contains(format!("line-{i}").as_str())))
                .count()
        })
        .sum();
    Ok(serde_json::json!({
        "runs_submitted": submitted.len(),
        "runs_completed": completed,
        "runs_dead_lettered": dead_lettered,
        "runs_owner_lost": owner_lost,
        "runs_wrong_outcome": wrong,
        "lifecycle_missing": lifecycle_missing,
        "lifecycle_duplicates": lifecycle_duplicates,
        "events_lost": events_lost,
        "events_duplicated": events_duplicated,
        "wrong_outcomes": why,
    }))
}

/// The benchmark's own nats-server, restartable on the same port and store.
struct PrivateNats {
    dir: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    fn start(dir: &Path) -> anyhow::Result<PrivateNats> {
        let mut nats = PrivateNats {
            dir: dir.join("nats"),
            port: free_port()?,
            child: None,
        };
        nats.start_again()?;
        Ok(nats)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn start_again(&mut self) -> anyhow::Result<()> {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server (is it on PATH?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not listen on {} within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The benchmark's own PostgreSQL cluster (initdb), stopped when dropped.
struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start(dir: &Path) -> anyhow::Result<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|v| v.filter_map(|v| v.ok()).map(|v| v.path().join("bin")).max())
            .filter(|bin| bin.join("initdb").exists())
            .context(
                "PostgreSQL's server binaries are not under /usr/lib/postgresql/<version>/bin",
            )?;
        let server = PrivatePostgres {
            dir: dir.join("pg"),
            bin,
            port: free_port()?,
        };
        std::fs::create_dir_all(&server.dir)?;
        if unsafe { libc::geteuid() } == 0 {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()?;
            if !status.success() {
                bail!("chown of {} failed", server.dir.display());
            }
        }
        let data = server.dir.join("data");
        server.tool(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )?;
        server.start_again()?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/corral", self.port)
    }

    fn database_url(&self) -> String {
        self.url()
    }

    fn tool(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let output = command.args(args).current_dir(&self.dir).output()?;
        if !output.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn start_again(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        self.tool(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        )
    }

    fn stop(&self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        self.tool(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
