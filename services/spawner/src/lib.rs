//! The spawner: owns sandboxes.
//!
//! It pulls `run` commands from the shared durable consumer (each command to
//! exactly one instance), asks the tracker to claim the run, creates the
//! sandbox, records its id before the run leaves `booting`, runs the agent,
//! publishes its output lines as `agent.output` events, enforces stop and the
//! owner's timers, finalizes behind the tracker's fence, and kills the
//! sandbox. For each run it owns it subscribes to `<prefix>.cmd.stop.<run_id>`,
//! so a stop published anywhere reaches it at once and nobody else. It
//! heartbeats its liveness to the tracker.

mod command;
pub mod config;
mod consumer;
mod outcomes;
mod session;
mod supervisor;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_client::{ActivityReporter, Client};
use corral_common::nats::NatsError;
use corral_proto::Subjects;
use corral_provider::Provider;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// The command line of `corral-spawner` and `corral serve spawner`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "corral-spawner",
    version,
    about = "corral's spawner: owns sandboxes and the agents running in them",
    long_about = "corral's spawner: owns sandboxes and the agents running in them.\n\nConfiguration: defaults < YAML file (--config) < CORRAL_* environment \
(e.g. CORRAL_SUBJECT_PREFIX; NATS_URL also works; CORRAL_HOME names the sandbox directory) < these flags.\n\nAdmin port: CORRAL_METRICS_ADDR=host:port (e.g. 127.0.0.1:9464) serves /metrics (Prometheus), /healthz (alive) and /readyz (NATS connected)."
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: config::Flags,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Prefix(#[from] corral_proto::PrefixError),
    #[error(transparent)]
    Client(#[from] corral_client::ClientError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("provider: {0}")]
    Provider(corral_provider::ProviderError),
    #[error("nats: {0}")]
    Consumer(String),
    /// The run-token keys are weak or inconsistent; the message names the setting.
    #[error("run-token keys: {0}")]
    Keys(String),
}

corral_common::from_cause!(corral_provider::ProviderError => Error::Provider);

/// What every task of one spawner shares.
pub(crate) struct Spawner {
    pub client: Client,
    pub provider: Arc<dyn Provider>,
    pub config: Config,
    pub id: String,
    pub actor: String,
    pub deployment: String,
    /// Run ids this instance owns right now.
    pub active: Mutex<HashSet<String>>,
    /// Woken whenever a run leaves `active`.
    pub released: Notify,
    /// One permit per owned run.
    pub permits: Arc<Semaphore>,
    /// The supervisors of owned runs.
    pub runs: TaskTracker,
    /// Cancelled when owned runs must end (drain timeout over).
    pub end_runs: CancellationToken,
    /// Cancelled when the spawner must exit now: outcomes not recorded yet
    /// are kept on disk ([`outcomes`]).
    pub exiting: CancellationToken,
    /// Progress reports to the tracker, coalesced.
    pub activity: Arc<ActivityReporter>,
    /// Signs the run tokens handed to agents; none configured: no token.
    pub keyring: Option<corral_common::token::Keyring>,
}

impl Spawner {
    pub fn subjects(&self) -> &Subjects {
        self.client.subjects()
    }

    /// Notes progress of a run; reported to the tracker about once a second.
    pub fn note_activity(&self, run_id: &str) {
        self.activity.note(run_id);
    }

    /// Where outcomes the tracker could not record before exit are kept.
    pub fn outcomes_dir(&self) -> std::path::PathBuf {
        self.config.home_dir().join("outcomes")
    }

    pub fn owned(&self) -> usize {
        self.active.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Marks the run as handled by this instance; false if it already was.
    pub fn activate(&self, run_id: &str) -> bool {
        self.active
            .lock()
            .map(|mut active| active.insert(run_id.to_owned()))
            .unwrap_or(false)
    }

    pub fn deactivate(&self, run_id: &str) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(run_id);
        }
        self.released.notify_waiters();
    }

    /// Marks the run as handled by this instance, waiting up to `limit` for
    /// a supervisor of it here to finish first. A kept run's turn is over
    /// for the tracker (idle, no owner) a moment before its supervisor
    /// returns: a continue sent in that moment is for the next turn.
    pub async fn activate_within(&self, run_id: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is seen.
            released.as_mut().enable();
            if self.activate(run_id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return false;
            }
        }
    }
}

/// After the drain timeout, how long ended runs have to report their
/// outcomes before those not recorded are kept on disk.
const OUTCOME_GRACE: Duration = Duration::from_secs(5);

/// Descriptors an owned run holds at most: the agent's output pipes, the
/// pidfds of the processes waited for, and bubblewrap's pipes while the
/// sandbox is created.
const OPEN_FILES_PER_RUN: u64 = 6;

/// Descriptors kept for everything else: connections to NATS and the
/// admin port, files read and written, the runtime's own.
const OPEN_FILES_SPARE: u64 = 64;

/// Raises the open-file limit as far as allowed and returns how many runs
/// it leaves room for, `max_runs` at most: a run past it would fail, and so
/// would the kill of its sandbox, with "Too many open files".
fn runs_the_open_file_limit_allows(max_runs: usize) -> usize {
    let wanted = max_runs.max(1);
    let Some(open_files) = corral_common::limits::raise_open_files() else {
        return wanted;
    };
    let allowed = corral_common::limits::runs_within(
        open_files,
        OPEN_FILES_PER_RUN,
        OPEN_FILES_SPARE,
        wanted,
    );
    if allowed < wanted {
        tracing::warn!(
            open_files,
            max_runs = wanted,
            allowed,
            "the open-file limit leaves room for {allowed} runs, not max_runs = {wanted}: \
             this spawner takes {allowed} at a time; raise the hard limit \
             (ulimit -Hn, systemd LimitNOFILE) to about {} for all of them",
            wanted as u64 * OPEN_FILES_PER_RUN + OPEN_FILES_SPARE
        );
    }
    allowed
}

/// Runs the spawner until `shutdown` is cancelled (SIGTERM). Then it drains:
/// it takes no new commands, keeps heartbeating (saying it drains, and
/// until when) and reporting activity while its runs go on for up to
/// `drain_timeout_ms`, ends the rest (`failed`, reason `spawner_shutdown`;
/// a kept run's turn is interrupted) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let starting = corral_common::admin::starting("spawner");
    // Cancelled once the last owned run is over (after the drain).
    let stopped = CancellationToken::new();
    let subjects = Subjects::new(&config.subject_prefix)?;
    let keyring = if config.token_keys.is_empty() && config.token_secret.expose().is_empty() {
        tracing::warn!(
            "no run-token keys (token_secret, token_keys): agents get no CORRAL_TOKEN and cannot post events"
        );
        None
    } else {
        Some(
            corral_common::token::Keyring::from_config(
                &config.token_keys,
                &config.token_secret,
                &config.token_signing_key,
                config.dev_mode,
            )
            .map_err(Error::Keys)?,
        )
    };
    let home = config.home_dir();
    let provider = corral_provider::build(
        &config.provider,
        &home,
        &config.local,
        &config.e2b,
        &config.daytona,
    )?;
    let max_runs = runs_the_open_file_limit_allows(config.max_runs);
    let id = config.spawner_id();
    let nats = corral_common::nats::connect_with(
        &config.nats_url,
        &config.nats_auth,
        &format!("corral-spawner {id}"),
        Duration::from_secs(5),
    )
    .await?;
    corral_common::admin::nats_check("spawner.nats", nats.clone());
    let client = Client::from_parts(nats, subjects.clone());
    corral_common::streams::ensure(
        client.jetstream(),
        &subjects,
        &config.streams,
        corral_common::streams::Existing::Keep,
    )
    .await?;
    let spawner = Arc::new(Spawner {
        provider,
        deployment: config.deployment_label(),
        actor: format!("spawner:{id}"),
        permits: Arc::new(Semaphore::new(max_runs)),
        active: Mutex::new(HashSet::new()),
        released: Notify::new(),
        runs: TaskTracker::new(),
        end_runs: CancellationToken::new(),
        exiting: CancellationToken::new(),
        activity: ActivityReporter::start(client.clone(), stopped.clone()),
        keyring,
        client,
        config,
        id,
    });
    starting.done();
    tracing::info!(spawner_id = %spawner.id, home = %home.display(), prefix = subjects.prefix(), "spawner started");

    // What an earlier spawner with this home could not record before it exited.
    let replaying = spawner.clone();
    spawner
        .runs
        .spawn(async move { outcomes::replay(&replaying).await });
    let draining = Arc::new(std::sync::OnceLock::new());
    let heartbeat = tokio::spawn(heartbeat(
        spawner.clone(),
        draining.clone(),
        stopped.clone(),
    ));
    let consumed = consumer::consume(spawner.clone(), shutdown.clone()).await;

    spawner.runs.close();
    let drain = Duration::from_millis(spawner.config.drain_timeout_ms);
    let deadline = corral_common::now_ms() + drain.as_millis() as i64;
    let _ = draining.set(deadline);
    if spawner.owned() > 0 {
        tracing::info!(
            owned = spawner.owned(),
            drain_timeout_ms = spawner.config.drain_timeout_ms,
            "draining: no new commands; owned runs may finish"
        );
        // Say so now, not at the next beat.
        beat(&spawner, Some(deadline)).await;
    }
    if tokio::time::timeout(drain, spawner.runs.wait())
        .await
        .is_err()
    {
        tracing::warn!(owned = spawner.owned(), "drain timeout: ending owned runs");
        spawner.end_runs.cancel();
        // Ended runs report their outcomes; what the tracker cannot take
        // by now is kept on disk.
        if tokio::time::timeout(OUTCOME_GRACE, spawner.runs.wait())
            .await
            .is_err()
        {
            spawner.exiting.cancel();
            spawner.runs.wait().await;
        }
    }
    stopped.cancel();
    let _ = heartbeat.await;
    let _ = spawner.client.nats().flush().await;
    tracing::info!(spawner_id = %spawner.id, "spawner stopped");
    consumed
}

/// Heartbeats until `stopped`; from when `draining` is set (the drain
/// deadline, ms), each beat says the spawner drains.
async fn heartbeat(
    spawner: Arc<Spawner>,
    draining: Arc<std::sync::OnceLock<i64>>,
    stopped: CancellationToken,
) {
    let mut tick =
        tokio::time::interval(Duration::from_millis(spawner.config.heartbeat_ms.max(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The exit does not wait for a beat the tracker is slow to answer.
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = beat(&spawner, draining.get().copied()) => {}
        }
    }
}

async fn beat(spawner: &Spawner, drain_deadline_ms: Option<i64>) {
    let owned = spawner.owned() as u32;
    if let Err(err) = spawner
        .client
        .heartbeat(&spawner.id, owned, drain_deadline_ms)
        .await
    {
        tracing::warn!(error = %err, "heartbeat failed");
    }
}
