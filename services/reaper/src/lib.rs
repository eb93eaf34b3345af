//! The reaper: the backstop that ends what its owner did not.
//!
//! One instance at a time is active ([`lease`]); the others stand by and take
//! over within the lease's TTL. Every sweep period the leader asks the
//! tracker for what is due — stops the owner did not honour, deadlines and
//! inactivity past their backstop grace, runs of owners whose heartbeat
//! lapsed, boots stuck past their limit — kills those sandboxes through the
//! provider directly and ends the runs; then it reconciles the provider's
//! list of this deployment's sandboxes against the live records: a sandbox no
//! live run claims is killed, and a live run whose sandbox is gone fails
//! with `sandbox_lost`.
//!
//! With a node-local provider (local sandboxes) the reconciliation is each
//! node's own: every reaper, leader or not, reconciles its node's sandboxes
//! and kills them when the leader of another node asks ([`node`]).
//!
//! Every action is pinned to what was judged: it kills only the sandbox id
//! it saw and applies the transition only at the run version it saw, so a
//! brief second leader or a race with the owner never ends the wrong thing.

pub mod config;
pub mod lease;
pub mod node;
pub mod sweep;

use std::sync::atomic::Ordering;
use std::time::Duration;

use corral_client::Client;
use corral_proto::Subjects;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The command line of `corral-reaper` and `corral serve reaper`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "corral-reaper",
    version,
    about = "corral's reaper: the backstop that ends what its owner did not",
    long_about = "corral's reaper: the backstop that ends what its owner did not.\n\n\
Configuration: defaults < YAML file (--config) < CORRAL_* environment (e.g. CORRAL_SWEEP_PERIOD_MS; \
NATS_URL also works) < these flags.\n\nAdmin port: CORRAL_METRICS_ADDR=host:port (e.g. 127.0.0.1:9464) serves /metrics (Prometheus), /healthz (alive) and /readyz (NATS connected)."
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
    Nats(#[from] corral_common::nats::NatsError),
    #[error("provider: {0}")]
    Provider(corral_provider::ProviderError),
    #[error("{0}")]
    Lease(String),
}

corral_common::from_cause!(corral_provider::ProviderError => Error::Provider);

/// Runs the reaper until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let starting = corral_common::admin::starting("reaper");
    let subjects = Subjects::new(&config.subject_prefix)?;
    let home = config.home_dir();
    let provider = corral_provider::build(
        &config.provider,
        &home,
        &config.local,
        &config.e2b,
        &config.daytona,
    )?;
    let id = config.reaper_id();
    let nats = corral_common::nats::connect_with(
        &config.nats_url,
        &config.nats_auth,
        &format!("corral-reaper {id}"),
        Duration::from_secs(5),
    )
    .await?;
    corral_common::admin::nats_check("reaper.nats", nats.clone());
    let client = Client::from_parts(nats, subjects.clone());
    corral_common::streams::ensure(
        client.jetstream(),
        &subjects,
        &config.streams,
        corral_common::streams::Existing::Keep,
    )
    .await?;
    let lease = lease::Lease::open(
        client.jetstream(),
        &subjects.reaper_lease_bucket(),
        &id,
        Duration::from_millis(config.lease_ttl_ms.max(300)),
        config.streams.most_replicas(),
    )
    .await
    .map_err(Error::Lease)?;
    let leader = lease.leader_flag();
    let lease_task = tokio::spawn(lease.run(shutdown.clone()));
    starting.done();
    tracing::info!(reaper_id = %id, prefix = subjects.prefix(), "reaper started");

    // A node-local provider's sandboxes are this node's business: kills
    // asked by the leader of another node, and reconciliation every period.
    let node = provider.node().map(str::to_owned);
    let node_task = node.clone().map(|node| {
        tracing::info!(node = %node, "serving this node's sandboxes");
        tokio::spawn(node::serve(
            client.clone(),
            provider.clone(),
            node,
            shutdown.clone(),
        ))
    });
    let reaper = sweep::Reaper::new(client.clone(), provider, &config, &id);
    let mut tick = tokio::time::interval(Duration::from_millis(config.sweep_period_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if node.is_some() {
            match reaper.reconcile_node().await {
                Ok(report) if report.acted() => {
                    tracing::info!(?report, "node reconciliation acted")
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "node reconciliation failed"),
            }
        }
        if !leader.load(Ordering::SeqCst) {
            continue;
        }
        match reaper.sweep().await {
            Ok(report) if report.acted() => tracing::info!(?report, "sweep acted"),
            Ok(report) => tracing::debug!(?report, "sweep found nothing due"),
            Err(err) => tracing::warn!(error = %err, "sweep failed"),
        }
    }
    if let Some(task) = node_task
        && let Ok(Err(err)) = task.await
    {
        tracing::warn!(error = %err, "node service failed");
    }
    let _ = lease_task.await;
    let _ = client.nats().flush().await;
    tracing::info!(reaper_id = %id, "reaper stopped");
    Ok(())
}
