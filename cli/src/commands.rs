//! The client commands: run, status, ls, stop.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_client::{Client, RunUpdate};
use corral_proto::v1::{
    ListRunsRequest, Run, RunCommand, RunSpec, RunState, Spawner, StopCommand, agent_event, output,
    stop_reply,
};

use crate::view::{self, RunView};

pub struct Global {
    pub nats_url: String,
    /// Credentials and TLS for NATS, from the flags and the environment.
    pub nats_auth: corral_common::nats::NatsAuth,
    /// The `--nats-*` flags alone (over a service's own configuration).
    pub nats_auth_flags: corral_common::config::NatsAuthFlags,
    pub prefix: String,
    pub json: bool,
}

impl Global {
    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect_with(&self.nats_url, &self.nats_auth, &self.prefix, "corral-cli")
            .await
            .context("cannot reach corral (set NATS_URL, and NATS_CREDS or the like when NATS needs credentials; start the services with `corral up`)")
    }
}

/// NATS credentials as the services take them: `--nats-*` flags over the
/// `NATS_*` and `CORRAL_NATS_AUTH__*` environment.
pub fn nats_auth(
    flags: &corral_common::config::NatsAuthFlags,
) -> anyhow::Result<corral_common::nats::NatsAuth> {
    #[derive(Default, serde::Serialize, serde::Deserialize)]
    #[serde(default)]
    struct Auth {
        nats_auth: corral_common::nats::NatsAuth,
    }
    #[derive(serde::Serialize)]
    struct Flags<'a> {
        #[serde(skip_serializing_if = "corral_common::config::NatsAuthFlags::is_empty")]
        nats_auth: &'a corral_common::config::NatsAuthFlags,
    }
    let auth: Auth = corral_common::config::load(
        None,
        &corral_common::config::process_env(),
        &Flags { nats_auth: flags },
    )?;
    Ok(auth.nats_auth)
}

pub fn who() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

#[derive(clap::Args)]
#[command(
    after_help = "Exit status with --wait: 0 completed; the agent's exit code (or 1) when it failed; \
124 timed out; 130 stopped.\n\nExample:\n  corral run --wait --label team=infra -- sh -c 'echo hello; exit 0'"
)]
pub struct RunArgs {
    /// Wait for the run to end, streaming its output; exit with its outcome.
    #[arg(long)]
    wait: bool,
    /// Absolute timeout, seconds (0 = the tracker's default, 300).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "SECS",
        allow_negative_numbers = true
    )]
    timeout: i32,
    /// Inactivity timeout, seconds; only output and progress events reset it (0 = default, 60).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "SECS",
        allow_negative_numbers = true
    )]
    idle_timeout: i32,
    /// A label for listing and cost (repeatable): --label team=infra.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// An environment variable for the agent (repeatable, not secret: it is stored with the run).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Choose the run id (1-64 of A-Z a-z 0-9 _ -); resubmitting the same id creates nothing new.
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,
    /// Command run in the sandbox after the agent exits 0, only if no stop or deadline came first.
    #[arg(long, value_name = "SHELL_COMMAND")]
    finalize: Option<String>,
    /// Provider (default: local).
    #[arg(long, value_name = "NAME")]
    provider: Option<String>,
    /// Address-space limit per sandbox process, MiB (0 = the spawner's default).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    memory_mib: u64,
    /// Keep the sandbox after the agent exits: the run goes idle, and `corral continue` runs the
    /// next turn in the same sandbox (files and background processes kept).
    #[arg(long)]
    keep_alive: bool,
    /// With --keep-alive: pause the sandbox after this long idle (billed at the paused rate), e.g.
    /// 10m, 90s [default 10m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "keep_alive")]
    idle_pause: Option<i32>,
    /// With --keep-alive: the session's whole lifetime, e.g. 24h [default 24h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "keep_alive")]
    max_lifetime: Option<i32>,
    /// Resource class: the row of the tracker's price table the run is billed at (default: default).
    #[arg(long, value_name = "CLASS")]
    resource_class: Option<String>,
    /// The sandbox's network with the local provider: host (the machine's; agents reach package
    /// registries and event ingest) or none (loopback only) [default: the spawner's local.network].
    #[arg(long, value_name = "NET", value_parser = ["host", "none"])]
    network: Option<String>,
    /// With --wait, give up waiting after this many seconds (the run goes on).
    #[arg(long, value_name = "SECS")]
    wait_timeout: Option<u64>,
    /// The agent command and its arguments, after `--`.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    argv: Vec<String>,
}

pub async fn run(global: &Global, args: RunArgs) -> anyhow::Result<ExitCode> {
    let command = RunCommand {
        run_id: args.run_id.unwrap_or_else(corral_client::new_run_id),
        spec: Some(RunSpec {
            argv: args.argv,
            env: args.env.into_iter().collect(),
            labels: args.labels.into_iter().collect(),
            timeout_secs: args.timeout,
            idle_timeout_secs: args.idle_timeout,
            provider: args.provider.unwrap_or_default(),
            keep_alive: args.keep_alive,
            finalize: args.finalize.unwrap_or_default(),
            memory_mib: args.memory_mib,
            cpu_secs: 0,
            idle_pause_secs: args.idle_pause.unwrap_or(0),
            max_lifetime_secs: args.max_lifetime.unwrap_or(0),
            resource_class: args.resource_class.unwrap_or_default(),
            network: args.network.unwrap_or_default(),
        }),
        requested_by: who(),
        submitted_at_ms: corral_common::now_ms(),
    };
    if let Err(reason) = corral_proto::validate::run_command(&command) {
        bail!("invalid run: {reason}");
    }
    let client = global.client().await?;
    let run_id = command.run_id.clone();
    if !args.wait {
        client.start_run(&command).await.context("submit failed")?;
        if global.json {
            println!("{}", serde_json::json!({ "run_id": run_id }));
        } else {
            println!("{run_id}");
        }
        return Ok(ExitCode::SUCCESS);
    }

    let watch = client.watch(&run_id).await?;
    client.start_run(&command).await.context("submit failed")?;
    if !global.json {
        println!("{run_id}");
    }
    let limit = args.wait_timeout.map(Duration::from_secs);
    // A kept run's turn ends when it goes idle.
    let run = follow(global, &client, watch, &run_id, limit, |run| {
        run.state().is_terminal() || run.state() == RunState::Idle
    })
    .await?;
    report_end(global, &run);
    Ok(outcome_code(&run))
}

/// Streams the run's output until `done` holds for the run (checked on each
/// lifecycle event, and every second in case one was missed).
pub async fn follow(
    global: &Global,
    client: &Client,
    mut watch: corral_client::RunWatch,
    run_id: &str,
    limit: Option<Duration>,
    done: impl Fn(&Run) -> bool,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    loop {
        let remaining = match limit {
            Some(limit) => match limit.checked_sub(started.elapsed()) {
                Some(remaining) => remaining,
                None => {
                    bail!("run {run_id} still going after {limit:?}; see `corral status {run_id}`")
                }
            },
            None => Duration::from_secs(1),
        };
        match tokio::time::timeout(remaining.min(Duration::from_secs(1)), watch.next()).await {
            Ok(Some(RunUpdate::Agent(event))) if !global.json => {
                if let Some(agent_event::Payload::Output(line)) = event.payload {
                    if line.stream == output::Stream::Stderr as i32 {
                        eprintln!("{}", line.line);
                    } else {
                        println!("{}", line.line);
                    }
                }
            }
            Ok(Some(RunUpdate::Lifecycle(_))) | Err(_) => {
                // A transition, or no news for a second: ask the record.
                let run = client.get(run_id).await?;
                if done(&run) {
                    return Ok(run);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("lost the connection to NATS while waiting"),
        }
    }
}

/// Parses `90s`, `10m`, `24h`, `1h30m` (or plain seconds) into seconds.
pub fn parse_duration(text: &str) -> Result<i32, String> {
    let secs = match text.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => humantime::parse_duration(text)
            .map_err(|err| format!("{text:?} is not a duration like 90s, 10m or 24h: {err}"))?
            .as_secs(),
    };
    i32::try_from(secs).map_err(|_| format!("{text:?} is too long"))
}

pub fn report_end(global: &Global, run: &Run) {
    if global.json {
        println!(
            "{}",
            serde_json::to_string(&RunView::from(run)).unwrap_or_default()
        );
        return;
    }
    let mut line = format!("run {} {}", run.run_id, run.state().name());
    if let Some(code) = run.exit_code {
        line.push_str(&format!(" (exit code {code})"));
    }
    if !run.reason.is_empty() {
        line.push_str(&format!(": {}", run.reason));
    }
    eprintln!("{line}");
}

/// 0 completed (or a kept run's turn exited 0); the agent's code (or 1)
/// failed; 124 timed out; 130 stopped.
pub fn outcome_code(run: &Run) -> ExitCode {
    match run.state() {
        RunState::Completed => ExitCode::SUCCESS,
        RunState::Idle | RunState::Paused if run.exit_code.unwrap_or(0) == 0 => ExitCode::SUCCESS,
        RunState::TimedOut => ExitCode::from(124),
        RunState::Stopped => ExitCode::from(130),
        _ => match run.exit_code {
            Some(code) if (1..=255).contains(&code) => ExitCode::from(code as u8),
            _ => ExitCode::from(1),
        },
    }
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The run's id, as `corral run` printed it.
    run_id: String,
}

pub async fn status(global: &Global, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = global.client().await?;
    let run = match client.get(&args.run_id).await {
        Ok(run) => run,
        Err(err) if err.code() == Some(corral_proto::v1::tracker_error::Code::NotFound) => {
            bail!(
                "no run {} (check the id, and --prefix if you use several deployments)",
                args.run_id
            )
        }
        Err(err) => return Err(err.into()),
    };
    if global.json {
        println!("{}", serde_json::to_string_pretty(&RunView::from(&run))?);
    } else {
        println!("{}", view::describe(&run));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  corral ls --status running --status booting --label team=infra"
)]
pub struct LsArgs {
    /// Only runs in this state (repeatable): pending, booting, running, idle, paused, finalizing,
    /// completed, failed, stopped, timed_out.
    #[arg(long = "status", value_name = "STATE", value_parser = parse_state)]
    states: Vec<RunState>,
    /// Only runs with this label (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// At most this many runs.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Page: only runs older than this run id.
    #[arg(long, value_name = "RUN_ID")]
    before: Option<String>,
}

fn parse_state(text: &str) -> Result<RunState, String> {
    RunState::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = RunState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown state {text:?}: use one of {}", names.join(", "))
    })
}

pub async fn ls(global: &Global, args: LsArgs) -> anyhow::Result<ExitCode> {
    let client = global.client().await?;
    let labels: HashMap<String, String> = args.labels.into_iter().collect();
    let runs = client
        .list(&ListRunsRequest {
            states: args.states.iter().map(|s| *s as i32).collect(),
            labels,
            limit: args.limit,
            before_run_id: args.before.unwrap_or_default(),
        })
        .await?;
    // Which owners drain (got SIGTERM): their runs finish, then they go.
    let draining: Vec<Spawner> = match client.spawners().await {
        Ok(spawners) => spawners
            .into_iter()
            // A drained spawner stops heartbeating and leaves the list.
            .filter(|s| {
                s.draining_since_ms > 0 && s.heartbeat_at_ms > corral_common::now_ms() - 30_000
            })
            .collect(),
        Err(err) => {
            eprintln!("warning: cannot list spawners ({err}); draining owners are not marked");
            Vec::new()
        }
    };
    let drains = |owner: &str| draining.iter().any(|s| s.spawner_id == owner);
    if global.json {
        let views: Vec<RunView> = runs
            .iter()
            .map(|run| RunView {
                owner_draining: drains(&run.owner),
                ..RunView::from(run)
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        println!(
            "{:<36}  {:<10}  {:>4}  {:<24}  {:>10}  {:<32}  COMMAND",
            "RUN", "STATE", "EXIT", "CREATED", "COST (USD)", "OWNER"
        );
        for run in &runs {
            println!("{}", view::row(run, drains(&run.owner)));
        }
        for spawner in &draining {
            println!(
                "spawner {} is draining: {} run(s) left; what is left is ended at {}",
                spawner.spawner_id,
                spawner.owned_runs,
                view::time(spawner.drain_deadline_ms).unwrap_or_else(|| "-".into())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// The run to stop.
    run_id: String,
    /// Why; recorded with the run.
    #[arg(long, default_value = "stopped from the cli")]
    reason: String,
    /// Wait until the run is terminal and print how long the stop took.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    wait_timeout: u64,
}

pub async fn stop(global: &Global, args: StopArgs) -> anyhow::Result<ExitCode> {
    use stop_reply::Outcome;
    let client = global.client().await?;
    let started = Instant::now();
    let stop = StopCommand {
        run_id: args.run_id.clone(),
        reason: args.reason,
        requested_by: who(),
        requested_at_ms: corral_common::now_ms(),
    };
    let (outcome, _) = client.stop(&stop).await?;
    let message = match outcome {
        Outcome::Accepted => "stop accepted",
        Outcome::AlreadyRequested => "a stop was already requested",
        Outcome::AlreadyTerminal => "run had already ended",
        Outcome::FinalizeInProgress => "finalize already in progress: the run will finish it",
        Outcome::NotFound => bail!("no run {}", args.run_id),
        Outcome::Unspecified => bail!("the tracker gave no answer"),
    };
    let mut final_run = None;
    if args.wait && outcome != Outcome::NotFound {
        final_run = Some(
            client
                .wait_terminal(&args.run_id, Duration::from_secs(args.wait_timeout))
                .await?,
        );
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if global.json {
        let outcome_name = format!("{outcome:?}").to_lowercase();
        let mut value = serde_json::json!({ "run_id": args.run_id, "outcome": outcome_name, "message": message });
        if let Some(run) = &final_run {
            value["run"] = serde_json::to_value(RunView::from(run))?;
            value["stop_ms"] = elapsed_ms.into();
        }
        println!("{value}");
    } else {
        println!("{}: {message}", args.run_id);
        if let Some(run) = &final_run {
            println!(
                "run {} {} after {elapsed_ms} ms: {}",
                run.run_id,
                run.state().name(),
                run.reason
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
