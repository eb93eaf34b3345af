//! `corral`: run agents in sandboxes, stop them, see them; run the services.

mod bench;
mod commands;
mod dlq;
mod events;
mod keys;
mod session;
mod up;
mod view;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_proto::v1::session_command;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "Run AI agents in sandboxes: create, watch, stop, time out, and never orphan them",
    long_about = "corral runs agent commands in sandboxes. `corral up` starts every service in one \
process (with the local process-group provider); `corral run` submits a run; `corral stop` stops one \
from anywhere; `corral status` and `corral ls` show what the tracker recorded.\n\n\
Every command finds NATS through NATS_URL (default nats://127.0.0.1:4222); the services find \
PostgreSQL through DATABASE_URL and keep local sandboxes under CORRAL_HOME (default ~/.corral).",
    after_help = "Examples:\n  corral up --demo\n  corral run --wait -- sh -c 'echo hello; exit 0'\n  corral run --timeout 300 --idle-timeout 60 --label team=infra -- python3 agent.py\n  corral status <run-id>\n  corral ls --status running --label team=infra --json\n  corral stop <run-id> --reason 'user pressed stop' --wait\n  corral run --keep-alive --idle-pause 10m --max-lifetime 24h -- ./agent.sh \"first prompt\"\n  corral continue <run-id> --wait -- ./agent.sh --resume \"second prompt\"\n  corral pause <run-id>; corral resume <run-id>\n  corral cost --label team=infra --since 24h"
)]
struct Cli {
    /// NATS server URL, or a cluster's comma-separated seed list.
    #[arg(
        long,
        global = true,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_name = "URL"
    )]
    nats_url: String,
    /// Subject prefix of the deployment to talk to.
    #[arg(
        long,
        global = true,
        env = "CORRAL_SUBJECT_PREFIX",
        default_value = "corral",
        value_name = "PREFIX"
    )]
    prefix: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    nats_auth: corral_common::config::NatsAuthFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a run: prints its id and returns, or with --wait streams its output and exits with its outcome.
    Run(commands::RunArgs),
    /// Show one run: state, owner, sandbox, timestamps, exit code, reason.
    Status(commands::StatusArgs),
    /// List runs, newest first.
    Ls(commands::LsArgs),
    /// Stop a run from anywhere: recorded durably, then routed to its owner.
    Stop(commands::StopArgs),
    /// Run the next turn of a kept run (`run --keep-alive`) in its sandbox.
    Continue(session::ContinueArgs),
    /// Pause a kept run's sandbox between turns (billed at the paused rate).
    Pause(session::SessionArgs),
    /// Resume a paused kept run's sandbox without running a turn.
    Resume(session::SessionArgs),
    /// Sum the cost of runs by label and period.
    Cost(session::CostArgs),
    /// Show a run's agent events (output, messages, tool use, edits) from the stream.
    Events(events::EventsArgs),
    /// The reference agent: posts a realistic event sequence through event ingest (runs in a sandbox).
    AgentDemo(events::AgentDemoArgs),
    /// List, show and replay dead letters: messages a service could not decode or apply.
    Dlq {
        #[command(subcommand)]
        command: dlq::Dlq,
    },
    /// Generate keys: read API keys, run-token keys, NATS users per role.
    Keys {
        #[command(subcommand)]
        command: keys::Keys,
    },
    /// Run every service in one process against NATS_URL and DATABASE_URL, with the local provider.
    Up(up::UpArgs),
    /// Run one service alone (as the corral-<service> binaries do).
    Serve {
        #[command(subcommand)]
        service: up::Service,
    },
    /// Measure corral: see `corral bench runs --help`.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

fn main() -> ExitCode {
    // Die quietly when a pipe reader leaves (`corral run ... | head -1`), as
    // other command-line tools do, instead of panicking on the next print.
    // SAFETY: restoring a signal's default action has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, each said once. corral's own errors
/// say their cause in their message and expose no source
/// (`corral_common::from_cause!`), but some others do both (a client
/// library's error, an error a context wraps), and anyhow's `{:#}` would
/// then print the cause a second time.
pub(crate) fn report(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = commands::Global {
        nats_auth: commands::nats_auth(&cli.nats_auth)?,
        nats_auth_flags: cli.nats_auth.clone(),
        nats_url: cli.nats_url,
        prefix: cli.prefix,
        json: cli.json,
    };
    match cli.command {
        Command::Run(args) => commands::run(&global, args).await,
        Command::Status(args) => commands::status(&global, args).await,
        Command::Ls(args) => commands::ls(&global, args).await,
        Command::Stop(args) => commands::stop(&global, args).await,
        Command::Continue(args) => session::continue_run(&global, args).await,
        Command::Pause(args) => {
            session::pause_or_resume(&global, args, session_command::Action::Pause).await
        }
        Command::Resume(args) => {
            session::pause_or_resume(&global, args, session_command::Action::Resume).await
        }
        Command::Cost(args) => session::cost(&global, args).await,
        Command::Events(args) => events::events(&global, args).await,
        Command::AgentDemo(args) => events::agent_demo(args).await,
        Command::Dlq { command } => dlq::dlq(&global, command).await,
        Command::Keys { command } => keys::keys(&global, command).await,
        Command::Up(args) => up::up(&global, args).await,
        Command::Serve { service } => up::serve(&global, service).await,
        Command::Bench { bench } => bench::bench(&global, bench).await,
    }
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("invalid request: bwrap is not installed")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("provider: {0}")]
    struct Outer(#[from] Inner);

    #[test]
    fn a_cause_the_message_already_says_is_not_repeated() {
        let err = anyhow::Error::from(Outer(Inner));
        assert_eq!(
            report(&err),
            "provider: invalid request: bwrap is not installed"
        );
        // A cause the message leaves out is still said.
        let err = anyhow::Error::from(Inner).context("cannot start the spawner");
        assert_eq!(
            report(&err),
            "cannot start the spawner: invalid request: bwrap is not installed"
        );
    }
}
