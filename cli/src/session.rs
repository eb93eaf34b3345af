//! Kept sessions from the command line: continue, pause, resume; and cost.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use corral_client::Client;
use corral_proto::v1::{
    ContinueCommand, CostLine, CostRequest, Run, RunState, SessionCommand, session_command,
};

use crate::commands::{self, Global, parse_pair, who};
use crate::view;

/// The run, or an error that says how to find the right id.
async fn get(client: &Client, run_id: &str) -> anyhow::Result<Run> {
    match client.get(run_id).await {
        Ok(run) => Ok(run),
        Err(err) if err.code() == Some(corral_proto::v1::tracker_error::Code::NotFound) => {
            bail!("no run {run_id} (check the id, and --prefix if you use several deployments)")
        }
        Err(err) => Err(err.into()),
    }
}

fn not_between_turns(run: &Run, what: &str) -> anyhow::Error {
    let state = run.state();
    let keep = run.spec.as_ref().is_some_and(|s| s.keep_alive);
    if !keep {
        anyhow::anyhow!(
            "run {} was not started with --keep-alive: only kept runs can {what}",
            run.run_id
        )
    } else if state.is_terminal() {
        anyhow::anyhow!(
            "run {} has ended ({}): start a new run",
            run.run_id,
            state.name()
        )
    } else {
        anyhow::anyhow!(
            "run {} is {}: {what} applies between turns (idle or paused); wait for the turn to end",
            run.run_id,
            state.name()
        )
    }
}

#[derive(clap::Args)]
#[command(
    after_help = "The turn runs in the run's sandbox: files and background processes from earlier turns \
are there. A paused sandbox is resumed first; one that expired or was killed is replaced (once) and \
the session id cleared — `corral status` says why. The agent finds its session id in \
CORRAL_SESSION_ID and the turn number in CORRAL_TURN.\n\nExample:\n  corral continue <run-id> --wait -- ./agent.sh --resume \"second prompt\""
)]
pub struct ContinueArgs {
    /// The kept run (started with `corral run --keep-alive`).
    run_id: String,
    /// Stream the turn's output and exit with its outcome once the run is idle again.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up waiting after this many seconds (the turn goes on).
    #[arg(long, value_name = "SECS")]
    wait_timeout: Option<u64>,
    /// The turn's command, after `--` (none: the run's own command again).
    #[arg(last = true, value_name = "COMMAND")]
    argv: Vec<String>,
}

pub async fn continue_run(global: &Global, args: ContinueArgs) -> anyhow::Result<ExitCode> {
    let client = global.client().await?;
    let run = get(&client, &args.run_id).await?;
    if !matches!(run.state(), RunState::Idle | RunState::Paused) {
        return Err(not_between_turns(&run, "continue"));
    }
    let command = ContinueCommand {
        run_id: args.run_id.clone(),
        argv: args.argv,
        requested_by: who(),
        submitted_at_ms: corral_common::now_ms(),
    };
    let watch = if args.wait {
        Some(client.watch(&args.run_id).await?)
    } else {
        None
    };
    client
        .continue_run(&command)
        .await
        .context("continue not published")?;
    let Some(watch) = watch else {
        if global.json {
            println!(
                "{}",
                serde_json::json!({ "run_id": args.run_id, "turn": run.turn + 1 })
            );
        } else {
            println!("{}: turn {} requested", args.run_id, run.turn + 1);
        }
        return Ok(ExitCode::SUCCESS);
    };
    let turn = run.turn;
    let limit = args.wait_timeout.map(Duration::from_secs);
    let run = commands::follow(global, &client, watch, &args.run_id, limit, |run| {
        run.state().is_terminal() || (run.state() == RunState::Idle && run.turn > turn)
    })
    .await?;
    commands::report_end(global, &run);
    Ok(commands::outcome_code(&run))
}

#[derive(clap::Args)]
pub struct SessionArgs {
    /// The kept run.
    run_id: String,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    wait_timeout: u64,
}

/// `corral pause` (idle → paused) and `corral resume` (paused → idle):
/// published to the spawners, then waited for until the record shows it.
pub async fn pause_or_resume(
    global: &Global,
    args: SessionArgs,
    action: session_command::Action,
) -> anyhow::Result<ExitCode> {
    use session_command::Action;
    let (from, to, verb) = match action {
        Action::Pause => (RunState::Idle, RunState::Paused, "pause"),
        _ => (RunState::Paused, RunState::Idle, "resume"),
    };
    let client = global.client().await?;
    let run = get(&client, &args.run_id).await?;
    if run.state() == to && run.owner.is_empty() {
        println!("{}: already {}", args.run_id, to.name());
        return Ok(ExitCode::SUCCESS);
    }
    if run.state() != from {
        return Err(not_between_turns(&run, verb));
    }
    let started = Instant::now();
    let command = SessionCommand {
        run_id: args.run_id.clone(),
        action: action as i32,
        requested_by: who(),
        requested_at_ms: corral_common::now_ms(),
    };
    client
        .session(&command)
        .await
        .context("command not published")?;
    let limit = Duration::from_secs(args.wait_timeout);
    // Done when the record shows the new state and the spawner let go.
    loop {
        let run = client.get(&args.run_id).await?;
        let elapsed = started.elapsed();
        if (run.state() == to && run.owner.is_empty()) || run.state().is_terminal() {
            if global.json {
                let mut value = serde_json::to_value(view::RunView::from(&run))?;
                value["elapsed_ms"] = (elapsed.as_millis() as u64).into();
                println!("{value}");
            } else {
                println!(
                    "{}: {} after {} ms",
                    run.run_id,
                    run.state().name(),
                    elapsed.as_millis()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if elapsed > limit {
            bail!(
                "run {} is still {} after {limit:?}: is a spawner running? (`corral status {}`)",
                run.run_id,
                run.state().name(),
                run.run_id
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(clap::Args)]
#[command(
    after_help = "Cost is every state interval of every matching run, clipped to the period, billed at \
the provider's running rate (booting, running, idle, finalizing) or paused rate (paused) for the run's \
resource class, from the tracker's price table (`prices` in its config file).\n\nExamples:\n  corral cost --since 24h\n  corral cost --label team=infra --by user --json"
)]
pub struct CostArgs {
    /// Only runs with this label (repeatable; all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Period start, as a duration back from now (24h, 7d) [default: all time].
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Period end, as a duration back from now [default: now].
    #[arg(long, value_name = "DURATION")]
    until: Option<String>,
    /// Group by this label's value (default: by provider/resource class).
    #[arg(long, value_name = "LABEL")]
    by: Option<String>,
}

fn ago(text: &Option<String>) -> anyhow::Result<i64> {
    match text {
        None => Ok(0),
        Some(text) => {
            let secs = commands::parse_duration(text).map_err(anyhow::Error::msg)?;
            Ok(corral_common::now_ms() - i64::from(secs) * 1000)
        }
    }
}

pub async fn cost(global: &Global, args: CostArgs) -> anyhow::Result<ExitCode> {
    let client = global.client().await?;
    let request = CostRequest {
        labels: args.labels.into_iter().collect::<HashMap<_, _>>(),
        since_ms: ago(&args.since)?,
        until_ms: ago(&args.until)?,
        group_by: args.by.unwrap_or_default(),
    };
    let reply = client.cost(&request).await?;
    let total = reply.total.unwrap_or_default();
    if global.json {
        let line = |l: &CostLine| {
            serde_json::json!({
                "key": l.key, "runs": l.runs, "running_ms": l.running_ms,
                "paused_ms": l.paused_ms, "cost_usd": l.cost_usd,
            })
        };
        let lines: Vec<_> = reply.lines.iter().map(line).collect();
        println!(
            "{}",
            serde_json::json!({ "lines": lines, "total": line(&total) })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32}  {:>5}  {:>16}  {:>16}  {:>12}",
        "GROUP", "RUNS", "RUNNING", "PAUSED", "COST (USD)"
    );
    for line in reply.lines.iter().chain([&total]) {
        println!(
            "{:<32}  {:>5}  {:>16}  {:>16}  {:>12.6}",
            line.key,
            line.runs,
            view::hms(line.running_ms),
            view::hms(line.paused_ms),
            line.cost_usd
        );
    }
    Ok(ExitCode::SUCCESS)
}
