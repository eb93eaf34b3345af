//! `corral up` (every service in one process) and `corral serve <service>`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use corral_common::config::process_env;
use tokio_util::sync::CancellationToken;

use crate::commands::Global;

#[derive(clap::Args)]
#[command(
    after_help = "Services started: tracker, spawner (local provider), reaper, event ingest (HTTP on 127.0.0.1:8470). NATS with JetStream \
and PostgreSQL must be reachable (NATS_URL, DATABASE_URL); the database is created if missing.\n\n\
Example:\n  DATABASE_URL=postgres://postgres@127.0.0.1/corral corral up --demo"
)]
pub struct UpArgs {
    /// Submit a demo run once the services are up and print its output.
    #[arg(long)]
    demo: bool,
    /// Log more: -v for info, -vv for debug (default: warnings and errors
    /// only; RUST_LOG, when set, decides instead).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Append the services' logs to FILE instead of standard error.
    #[arg(long, value_name = "FILE")]
    log_file: Option<std::path::PathBuf>,
    /// Directory for local sandboxes [env: CORRAL_HOME; default ~/.corral].
    #[arg(long, value_name = "DIR")]
    home: Option<std::path::PathBuf>,
    /// YAML configuration of the tracker.
    #[arg(long, value_name = "FILE")]
    tracker_config: Option<std::path::PathBuf>,
    /// YAML configuration of the spawner.
    #[arg(long, value_name = "FILE")]
    spawner_config: Option<std::path::PathBuf>,
    /// YAML configuration of the reaper.
    #[arg(long, value_name = "FILE")]
    reaper_config: Option<std::path::PathBuf>,
    /// YAML configuration of event ingest.
    #[arg(long, value_name = "FILE")]
    ingest_config: Option<std::path::PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum Service {
    /// The tracker; `corral serve tracker -- --help` lists its flags.
    Tracker {
        /// Flags of corral-tracker.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        args: Vec<String>,
    },
    /// The spawner; `corral serve spawner -- --help` lists its flags.
    Spawner {
        /// Flags of corral-spawner.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        args: Vec<String>,
    },
    /// Event ingest; `corral serve event-ingest -- --help` lists its flags.
    EventIngest {
        /// Flags of corral-event-ingest.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        args: Vec<String>,
    },
    /// The reaper; `corral serve reaper -- --help` lists its flags.
    Reaper {
        /// Flags of corral-reaper.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        args: Vec<String>,
    },
}

/// Every service `corral up` runs talks to the same NATS and prefix.
fn common(
    global: &Global,
    config: Option<std::path::PathBuf>,
) -> corral_common::config::CommonFlags {
    corral_common::config::CommonFlags {
        config,
        nats_url: Some(global.nats_url.clone()),
        subject_prefix: Some(global.prefix.clone()),
        nats_auth: Default::default(),
    }
}

pub async fn up(global: &Global, args: UpArgs) -> anyhow::Result<ExitCode> {
    let env = process_env();
    let mut tracker: corral_tracker::Config = corral_tracker::config::Flags {
        common: common(global, args.tracker_config),
        ..Default::default()
    }
    .load(&env)?;
    let mut spawner: corral_spawner::Config = corral_spawner::config::Flags {
        common: common(global, args.spawner_config),
        home: args.home.clone(),
        ..Default::default()
    }
    .load(&env)?;
    let mut reaper: corral_reaper::Config = corral_reaper::config::Flags {
        common: common(global, args.reaper_config),
        home: args.home,
        ..Default::default()
    }
    .load(&env)?;
    let mut ingest: corral_event_ingest::Config = corral_event_ingest::config::Flags {
        common: common(global, args.ingest_config),
        ..Default::default()
    }
    .load(&env)?;
    // A laptop's ingest on loopback with no read keys: reads are open.
    if ingest.api_keys.is_empty()
        && ingest
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    {
        ingest.anonymous_reads = true;
    }
    // The credential files this command was given as flags.
    global.nats_auth_flags.apply(&mut tracker.nats_auth);
    global.nats_auth_flags.apply(&mut spawner.nats_auth);
    global.nats_auth_flags.apply(&mut reaper.nats_auth);
    global.nats_auth_flags.apply(&mut ingest.nats_auth);
    // One token keyring for the spawner (which mints) and ingest (which
    // checks): a random key for this process unless CORRAL_TOKEN_SECRET or
    // CORRAL_TOKEN_KEYS__<ID> name some.
    let mut keys = spawner.token_keys.clone();
    keys.extend(ingest.token_keys.clone());
    let secret = match (spawner.token_secret.expose(), ingest.token_secret.expose()) {
        ("", "") if keys.is_empty() => {
            corral_common::Secret::new(format!("{:032x}", rand::random::<u128>()))
        }
        ("", given) | (given, _) => corral_common::Secret::new(given),
    };
    spawner.token_secret = secret.clone();
    spawner.token_keys = keys.clone();
    ingest.token_secret = secret;
    ingest.token_keys = keys;
    // The demo's agent is this binary: an isolated sandbox sees it read-only
    // at DEMO_AGENT (a sandbox sees no host path it is not given, and its
    // own /work hides whatever the host has there).
    if let Ok(exe) = std::env::current_exe() {
        spawner
            .local
            .binds
            .push(format!("{}:{DEMO_AGENT}:ro", exe.display()));
    }
    // Agents reach the ingest this process runs, unless told otherwise.
    if spawner.events_url == corral_spawner::Config::default().events_url {
        spawner.events_url = format!("http://{}", ingest.listen.replace("0.0.0.0", "127.0.0.1"));
    }
    // Ctrl-C on a workstation: runs get half a minute to finish, not the
    // ten minutes a cluster's drain allows (unless configured).
    if spawner.drain_timeout_ms == corral_spawner::Config::default().drain_timeout_ms {
        spawner.drain_timeout_ms = 30_000;
    }
    // A workstation's terminal shows the demo and problems, not every
    // service's INFO lines.
    let logging = corral_common::telemetry::Logging {
        default_level: match args.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
        .into(),
        file: args.log_file.clone(),
    };
    let drain_secs = spawner.drain_timeout_ms / 1000;
    let telemetry =
        corral_common::telemetry::init_with("corral", &logging).map_err(anyhow::Error::msg)?;
    let admin = corral_common::admin::serve_from_env()
        .await
        .map_err(anyhow::Error::msg)?;
    // Ingest's port first: one already taken is an error now, naming the
    // setting, not when the other services are up.
    let ingest_listen = ingest.listen.clone();
    let ingest = corral_event_ingest::Bound::bind(ingest)
        .await
        .map_err(|err| match err {
            corral_event_ingest::Error::Listen { addr, error } => anyhow::anyhow!(
                "event ingest cannot listen on {addr}: {error}; give it another address with \
                 CORRAL_LISTEN=127.0.0.1:<port> (or `listen:` in --ingest-config)"
            ),
            other => other.into(),
        })?;
    let ingest_addr = format!(
        "http://{}:{}",
        ingest_listen
            .rsplit_once(':')
            .map(|(host, _)| host.replace("0.0.0.0", "127.0.0.1"))
            .unwrap_or_else(|| "127.0.0.1".into()),
        ingest.port()
    );
    let shutdown = corral_common::shutdown::signal_token();

    // The spawner drains first (its runs record their outcomes through the
    // tracker, their events through ingest); the others stop after it.
    let after_spawner = tokio_util::sync::CancellationToken::new();
    // The tracker first: it creates the database and the spawner claims through it.
    let tracker_task = tokio::spawn(corral_tracker::run(tracker, after_spawner.clone()));
    let client = global.client().await?;
    wait_for_tracker(&client, &tracker_task).await?;
    let spawner_task = tokio::spawn(corral_spawner::run(spawner, shutdown.clone()));
    let reaper_task = tokio::spawn(corral_reaper::run(reaper, after_spawner.clone()));
    let ingest_task = tokio::spawn(ingest.run(after_spawner.clone()));
    eprintln!(
        "{}",
        banner(global, &ingest_addr, admin, &logging, drain_secs)
    );

    if args.demo {
        let demo_shutdown = shutdown.clone();
        let global = Global {
            nats_url: global.nats_url.clone(),
            nats_auth: global.nats_auth.clone(),
            nats_auth_flags: global.nats_auth_flags.clone(),
            prefix: global.prefix.clone(),
            json: false,
        };
        tokio::spawn(async move {
            if let Err(err) = demo(&global, demo_shutdown).await {
                eprintln!("demo run failed: {}", crate::report(&err));
            }
        });
    }

    let spawner_result = spawner_task.await;
    after_spawner.cancel();
    let (tracker_result, reaper_result, ingest_result) =
        tokio::join!(tracker_task, reaper_task, ingest_task);
    telemetry.shutdown();
    ingest_result.context("event ingest panicked")??;
    reaper_result.context("reaper panicked")??;
    spawner_result.context("spawner panicked")??;
    tracker_result.context("tracker panicked")??;
    Ok(ExitCode::SUCCESS)
}

/// What `corral up` prints once every service is up: where things are and
/// how to stop.
fn banner(
    global: &Global,
    ingest: &str,
    admin: Option<std::net::SocketAddr>,
    logging: &corral_common::telemetry::Logging,
    drain_secs: u64,
) -> String {
    let mut lines = vec![
        format!(
            "corral is up: tracker, spawner (local sandboxes), reaper and event ingest on {} (prefix {})",
            corral_common::nats::redact_url(&global.nats_url),
            global.prefix
        ),
        format!("  console       {ingest}/console  (runs, their events live, stop buttons)"),
        format!("  event ingest  {ingest}  (agents post events; GET /v1/runs/<run-id>/events)"),
    ];
    if let Some(admin) = admin {
        lines.push(format!(
            "  admin         http://{admin}/metrics, /healthz, /readyz"
        ));
    }
    let level = if std::env::var_os("RUST_LOG").is_some() {
        "as RUST_LOG says".to_owned()
    } else {
        format!("{} and above", logging.default_level)
    };
    lines.push(match &logging.file {
        Some(file) => format!("  logs          {level}, to {}", file.display()),
        None => {
            format!("  logs          {level}, here (-v for more, --log-file FILE to move them)")
        }
    });
    // Another shell reaches this deployment only with its prefix.
    let prefix = if global.prefix == "corral" {
        String::new()
    } else {
        format!("--prefix {} ", global.prefix)
    };
    lines.push(format!(
        "  try           corral {prefix}run --wait -- sh -c 'echo hello'   (in another shell)"
    ));
    lines.push(format!(
        "  stop          Ctrl-C (runs get {drain_secs} s to finish)"
    ));
    lines.join("\n")
}

async fn wait_for_tracker(
    client: &corral_client::Client,
    tracker: &tokio::task::JoinHandle<Result<(), corral_tracker::Error>>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tracker.is_finished() {
            anyhow::bail!("the tracker stopped during start-up (see the log above)");
        }
        match client.get("corral-up-probe").await {
            Ok(_) => return Ok(()),
            Err(err) if err.code().is_some() => return Ok(()), // it answered: not found
            Err(err) if tokio::time::Instant::now() > deadline => {
                return Err(err).context("the tracker did not answer within 30 s");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Where an isolated demo sandbox sees the `corral` binary.
const DEMO_AGENT: &str = "/opt/corral/bin/corral";

async fn demo(global: &Global, shutdown: CancellationToken) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the corral binary")?;
    let exe = exe.to_string_lossy().into_owned();
    // The reference agent posts its events over HTTP; the shell lines are output.
    // Isolated, the binary is at DEMO_AGENT; with `isolation: none`, where it is.
    let script = format!(
        "echo \"hello from sandbox $CORRAL_SANDBOX_ID (run $CORRAL_RUN_ID)\"; echo \"working in $(pwd)\"; \
         agent={DEMO_AGENT}; [ -x \"$agent\" ] || agent='{exe}'; \"$agent\" agent-demo"
    );
    let run_id = corral_client::new_run_id();
    let corral = |args: &[&str]| {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["--nats-url", &global.nats_url, "--prefix", &global.prefix])
            .args(args)
            .kill_on_drop(true);
        command
    };
    let mut run = corral(&[
        "run",
        "--wait",
        "--run-id",
        &run_id,
        "--label",
        "demo=true",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .spawn()
    .context("cannot start the demo run")?;
    tokio::select! {
        status = run.wait() => {
            let status = status?;
            eprintln!("demo run finished ({status}); its agent events:");
            corral(&["events", &run_id]).status().await?;
        }
        _ = shutdown.cancelled() => return Ok(()),
    }
    tokio::select! {
        kept = demo_session(&corral) => kept?,
        _ = shutdown.cancelled() => return Ok(()),
    }
    eprintln!(
        "try `corral ls`, `corral status {run_id}` and `corral events {run_id}` in another shell"
    );
    Ok(())
}

/// A kept session: two turns in one sandbox with a pause between, then its
/// status (with its cost) and a stop.
async fn demo_session(corral: &impl Fn(&[&str]) -> tokio::process::Command) -> anyhow::Result<()> {
    let session = corral_client::new_run_id();
    eprintln!("\ndemo session {session}: turn 1 writes a file and keeps the sandbox");
    let turn1 = "echo \"turn $CORRAL_TURN: writing notes.txt\"; echo 'remember me' > notes.txt";
    corral(&[
        "run",
        "--wait",
        "--keep-alive",
        "--idle-pause",
        "10m",
        "--run-id",
        &session,
        "--label",
        "demo=true",
        "--",
        "sh",
        "-c",
        turn1,
    ])
    .status()
    .await?;
    corral(&["pause", &session]).status().await?;
    eprintln!("turn 2 continues the paused session: resumed, same sandbox, same files");
    let turn2 = "echo \"turn $CORRAL_TURN reads: $(cat notes.txt)\"";
    corral(&["continue", &session, "--wait", "--", "sh", "-c", turn2])
        .status()
        .await?;
    corral(&["status", &session]).status().await?;
    corral(&["stop", &session, "--wait", "--reason", "demo over"])
        .status()
        .await?;
    Ok(())
}

pub async fn serve(global: &Global, service: Service) -> anyhow::Result<ExitCode> {
    let env = process_env();
    let argv0 = |name: &str| std::iter::once(format!("corral serve {name}"));
    // Parse first, so a bad flag or key fails before anything starts.
    let (name, service): (
        &'static str,
        futures::future::BoxFuture<'static, anyhow::Result<()>>,
    ) = match service {
        Service::Tracker { args } => {
            let mut config = corral_tracker::Cli::parse_from(argv0("tracker").chain(args))
                .flags
                .load(&env)?;
            global.nats_auth_flags.apply(&mut config.nats_auth);
            (
                "corral-tracker",
                Box::pin(async move { Ok(corral_tracker::run(config, signal()).await?) }),
            )
        }
        Service::Spawner { args } => {
            let mut config = corral_spawner::Cli::parse_from(argv0("spawner").chain(args))
                .flags
                .load(&env)?;
            global.nats_auth_flags.apply(&mut config.nats_auth);
            (
                "corral-spawner",
                Box::pin(async move { Ok(corral_spawner::run(config, signal()).await?) }),
            )
        }
        Service::EventIngest { args } => {
            let mut config =
                corral_event_ingest::Cli::parse_from(argv0("event-ingest").chain(args))
                    .flags
                    .load(&env)?;
            global.nats_auth_flags.apply(&mut config.nats_auth);
            (
                "corral-event-ingest",
                Box::pin(async move { Ok(corral_event_ingest::run(config, signal()).await?) }),
            )
        }
        Service::Reaper { args } => {
            let mut config = corral_reaper::Cli::parse_from(argv0("reaper").chain(args))
                .flags
                .load(&env)?;
            global.nats_auth_flags.apply(&mut config.nats_auth);
            (
                "corral-reaper",
                Box::pin(async move { Ok(corral_reaper::run(config, signal()).await?) }),
            )
        }
    };
    let telemetry = corral_common::telemetry::init(name).map_err(anyhow::Error::msg)?;
    corral_common::admin::serve_from_env()
        .await
        .map_err(anyhow::Error::msg)?;
    let result = service.await;
    telemetry.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}

fn signal() -> CancellationToken {
    corral_common::shutdown::signal_token()
}
