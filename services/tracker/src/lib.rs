//! The tracker: the single authority over run state.
//!
//! It owns the `runs` tables, applies transitions with compare-and-set
//! (decided by [`state::next`]), answers request-reply on
//! `<prefix>.tracker.<op>` in the queue group `tracker` (so instances share
//! the load), records stop requests durably — both those asked of it and
//! those clients published on `<prefix>.cmd.stop.<run_id>` — and announces
//! each applied transition on `<prefix>.lifecycle.<run_id>` through the
//! outbox relay ([`relay`]): exactly once, in order per run.

pub mod config;
pub mod cost;
pub mod handlers;
pub mod relay;
pub mod state;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use corral_common::delivery::{DeadLetters, Delivery};
use corral_common::nats::{self, NatsError};
use corral_proto::Subjects;
use corral_proto::v1::StopCommand;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::Config;

/// The command line of `corral-tracker` and `corral serve tracker`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "corral-tracker",
    version,
    about = "corral's tracker: the single authority over run state",
    long_about = "corral's tracker: the single authority over run state.\n\nConfiguration: defaults < YAML file (--config) < CORRAL_* environment \
(e.g. CORRAL_SUBJECT_PREFIX; NATS_URL and DATABASE_URL also work) < these flags.\n\nAdmin port: CORRAL_METRICS_ADDR=host:port (e.g. 127.0.0.1:9464) serves /metrics (Prometheus), /healthz (alive) and /readyz (NATS connected, PostgreSQL reachable)."
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: config::Flags,
}
use handlers::Handlers;
use store::{Defaults, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Prefix(#[from] corral_proto::PrefixError),
    #[error("cannot open the database: {0}")]
    Store(StoreError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("nats: {0}")]
    Subscribe(String),
}

corral_common::from_cause!(StoreError => Error::Store);

/// Runs the tracker until `shutdown` is cancelled; finishes requests in hand.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let starting = corral_common::admin::starting("tracker");
    let subjects = Subjects::new(&config.subject_prefix)?;
    let defaults = Defaults {
        timeout_secs: config.default_timeout_secs,
        idle_timeout_secs: config.default_idle_timeout_secs,
        idle_pause_secs: config.default_idle_pause_secs,
        max_lifetime_secs: config.default_max_lifetime_secs,
    };
    let store = Store::connect(
        config.database_url.expose(),
        config.db_pool_size,
        defaults,
        config.prices.clone(),
    )
    .await?;
    let client = nats::connect_with(
        &config.nats_url,
        &config.nats_auth,
        "corral-tracker",
        Duration::from_secs(5),
    )
    .await?;
    let js = jetstream::new(client.clone());
    // The tracker brings existing streams to the configured settings.
    corral_common::streams::ensure(
        &js,
        &subjects,
        &config.streams,
        corral_common::streams::Existing::Update,
    )
    .await?;
    let relay = relay::Relay::new(store.pool().clone(), js.clone(), subjects.clone());
    let handlers = Arc::new(Handlers {
        store,
        js: js.clone(),
        subjects: subjects.clone(),
        relay: relay.clone(),
    });
    corral_common::admin::nats_check("tracker.nats", client.clone());
    let ping = handlers.clone();
    corral_common::admin::ready_check("tracker.postgres", move || {
        let handlers = ping.clone();
        async move { handlers.store.ping().await.map_err(|err| err.to_string()) }
    });
    starting.done();
    tracing::info!(prefix = subjects.prefix(), "tracker started");

    let requests = serve_requests(
        &client,
        handlers.clone(),
        config.max_in_flight,
        shutdown.clone(),
    );
    let stops = consume_stops(&js, handlers.clone(), shutdown.clone());
    let relaying = tokio::spawn(relay.run(shutdown.clone()));
    let result = tokio::try_join!(requests, stops);
    shutdown.cancel();
    // The relay's last round announces what the last requests committed.
    let _ = relaying.await;
    handlers.store.close().await;
    let _ = client.flush().await;
    tracing::info!("tracker stopped");
    result.map(|_| ())
}

async fn serve_requests(
    client: &async_nats::Client,
    handlers: Arc<Handlers>,
    max_in_flight: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let subjects = handlers.subjects.clone();
    let mut requests = client
        .queue_subscribe(subjects.tracker_all(), Subjects::TRACKER_QUEUE_GROUP.into())
        .await
        .map_err(|err| Error::Subscribe(err.to_string()))?;
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let in_flight = TaskTracker::new();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let handlers = handlers.clone();
        let client = client.clone();
        let op = subjects
            .tracker_op(&message.subject)
            .unwrap_or("")
            .to_owned();
        let span = tracing::info_span!("tracker_request", op = %op);
        corral_common::telemetry::adopt(&span, message.headers.as_ref());
        in_flight.spawn(
            async move {
                let reply = handlers.handle(&op, &message.payload).await;
                if let Some(inbox) = message.reply
                    && let Err(err) = client.publish(inbox, reply.into()).await
                {
                    tracing::warn!(error = %err, "reply failed");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    let _ = requests.unsubscribe().await;
    in_flight.close();
    in_flight.wait().await;
    Ok(())
}

/// Longest wait before a stop the database did not take is tried again.
const STOP_RETRY_MAX: Duration = Duration::from_secs(5);

/// Records stop commands that clients published on the command stream; the
/// owner heard each at once through its own subscription. A stop that does
/// not decode or names another run than its subject is dead-lettered.
async fn consume_stops(
    js: &jetstream::Context,
    handlers: Arc<Handlers>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let subjects = handlers.subjects.clone();
    let consumer = corral_common::streams::pull_consumer_patiently(
        js,
        &subjects.cmd_stream(),
        consumer::pull::Config {
            durable_name: Some(Subjects::TRACKER_STOP_CONSUMER.into()),
            filter_subject: subjects.cmd_stop_all(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            // No delivery limit: a stop is retried until it is recorded
            // (its owner heard it at once anyway); only what retrying
            // cannot fix is dead-lettered.
            max_deliver: -1,
            ..Default::default()
        },
    )
    .await
    .map_err(Error::Subscribe)?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|err| Error::Subscribe(err.to_string()))?;
    let dead_letters = DeadLetters::new(js.clone(), &subjects, "cmd");
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = messages.next() => match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "stop consumer error");
                    continue;
                }
                None => return Ok(()),
            },
        };
        let subject_run = message.subject.rsplit('.').next().unwrap_or("").to_owned();
        let matches_subject = |stop: &StopCommand| {
            if stop.run_id == subject_run {
                return Ok(());
            }
            Err(format!(
                "StopCommand.run_id {:?} does not match the subject's run id {:?}",
                stop.run_id, subject_run
            ))
        };
        let Some(delivery) = Delivery::decode(message, &dead_letters, matches_subject).await else {
            continue;
        };
        let stop = delivery.value();
        match handlers.record_stop(stop, false).await {
            Ok((outcome, _)) => {
                tracing::info!(run_id = %stop.run_id, outcome = ?outcome, "stop command recorded");
                delivery.ack().await;
            }
            Err(err) if err.is_transient() => {
                let deliveries = delivery.deliveries();
                // The backoff, at most 5 s, for as long as it takes.
                let delay = delivery.backoff().min(STOP_RETRY_MAX);
                tracing::warn!(run_id = %stop.run_id, error = %err, deliveries, ?delay, "stop not recorded, will retry");
                delivery.nak_after(delay).await;
            }
            Err(err) => {
                delivery.dead_letter(&err.to_string()).await;
            }
        }
    }
}
