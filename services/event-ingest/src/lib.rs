//! Event ingest: agent events stored exactly once, served live.
//!
//! Two ways in: agents post JSON over HTTP with their run's token (answered
//! 202 only after JetStream acknowledged), trusted services publish
//! `AgentEvent` on `<prefix>.events.<run_id>.<kind>`. Both land on the events
//! stream, from which the persisting consumer stores them in
//! `sandbox_events` exactly once and reports progress as activity. Reads:
//! pages from PostgreSQL and a live tail from the stream. Any number of
//! analytics consumers read the same stream with durable consumers of their
//! own (see `examples/analytics-consumer`).
//!
//! With `genai_traces` set, every run that ends is also exported as one
//! OpenTelemetry trace following the GenAI semantic conventions (`genai.rs`).

pub mod auth;
pub mod config;
pub mod console;
pub mod genai;
pub mod http;
pub mod persister;
pub mod store;
pub mod webhooks;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use corral_client::{ActivityReporter, Client};
use corral_proto::Subjects;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The command line of `corral-event-ingest` and `corral serve event-ingest`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "corral-event-ingest",
    version,
    about = "corral's event ingest: agent events over HTTP and NATS, stored exactly once, served live",
    long_about = "corral's event ingest: agent events over HTTP and NATS, stored exactly once, served live.\n\n\
Configuration: defaults < YAML file (--config) < CORRAL_* environment (e.g. CORRAL_TOKEN_SECRET, \
CORRAL_LISTEN; NATS_URL and DATABASE_URL also work) < these flags.\n\nAdmin port: CORRAL_METRICS_ADDR=host:port (e.g. 127.0.0.1:9464) serves /metrics (Prometheus), /healthz (alive) and /readyz (NATS connected, PostgreSQL reachable); the HTTP API has its own /healthz and /readyz too."
)]
pub struct Cli {
    #[command(flatten)]
    pub flags: config::Flags,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Prefix(#[from] corral_proto::PrefixError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("cannot listen on {addr}: {error} (set `listen`, CORRAL_LISTEN, to a free host:port)")]
    Listen { addr: String, error: std::io::Error },
    /// Keys are missing, weak or malformed; the message names the setting.
    #[error("keys: {0}")]
    Keys(String),
    /// `genai_traces` is not a usable URL, or its client cannot be made.
    #[error("genai_traces: {0}")]
    GenaiTraces(String),
    /// A webhook endpoint is misconfigured; the message names the setting.
    #[error("{0}")]
    Webhooks(String),
}

corral_common::from_cause!(
    sqlx::Error => Error::Db,
    sqlx::migrate::MigrateError => Error::Migrate,
);

/// A bound HTTP listener; `port()` tells where tests must connect.
pub struct Bound {
    listener: tokio::net::TcpListener,
    config: Config,
}

impl Bound {
    pub async fn bind(config: Config) -> Result<Bound, Error> {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|error| Error::Listen {
                addr: config.listen.clone(),
                error,
            })?;
        Ok(Bound { listener, config })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let starting = corral_common::admin::starting("event-ingest");
        let config = self.config;
        let keyring = corral_common::token::Keyring::from_config(
            &config.token_keys,
            &config.token_secret,
            "",
            config.dev_mode,
        )
        .map_err(Error::Keys)?;
        let mut auth = auth::Auth::new(
            &config.api_keys,
            auth::Limits {
                rate_per_sec: config.read_rate_per_sec,
                burst: config.read_burst,
                streams: config.max_streams_per_key,
            },
            config.dev_mode || config.anonymous_reads,
        )
        .map_err(Error::Keys)?;
        // The console's buttons need no key only where nobody else can reach them.
        auth.allow_anonymous_control(
            self.listener
                .local_addr()
                .is_ok_and(|a| a.ip().is_loopback()),
        );
        let endpoints = webhooks::endpoints(&config.webhooks).map_err(Error::Webhooks)?;
        let subjects = Subjects::new(&config.subject_prefix)?;
        let pool = PgPoolOptions::new()
            .max_connections(config.db_pool_size)
            .acquire_timeout(Duration::from_secs(5))
            .connect(config.database_url.expose())
            .await?;
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        let nats = corral_common::nats::connect_with(
            &config.nats_url,
            &config.nats_auth,
            "corral-event-ingest",
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
        corral_common::admin::nats_check("event-ingest.nats", nats.clone());
        let ping = pool.clone();
        corral_common::admin::ready_check("event-ingest.postgres", move || {
            let pool = ping.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string())
            }
        });
        let client = Client::from_parts(nats.clone(), subjects.clone());
        let js = client.jetstream().clone();
        corral_common::streams::ensure(
            &js,
            &subjects,
            &config.streams,
            corral_common::streams::Existing::Keep,
        )
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
        let activity = ActivityReporter::start(client.clone(), shutdown.clone());
        let watermark = Arc::new(persister::Watermark::new(js.clone(), subjects.clone()));
        let state = Arc::new(http::AppState {
            js: js.clone(),
            nats: nats.clone(),
            subjects: subjects.clone(),
            pool: pool.clone(),
            keyring,
            auth,
            max_diff: config.max_diff_bytes,
            shutdown: shutdown.clone(),
            client: client.clone(),
            liveness: Default::default(),
            watermark: watermark.clone(),
        });
        // Before ready: each endpoint's consumer exists, so what is
        // published from now on reaches it.
        let webhooks = webhooks::Webhooks::start(
            endpoints,
            client.clone(),
            subjects.clone(),
            shutdown.clone(),
        )
        .await?;
        // Before ready, like the webhooks: runs that end from now on are traced.
        let genai = match config.genai_traces.as_deref().filter(|url| !url.is_empty()) {
            Some(url) => Some(
                genai::GenaiTraces::start(
                    js.clone(),
                    subjects.clone(),
                    pool.clone(),
                    client.clone(),
                    watermark.clone(),
                    url,
                )
                .await?,
            ),
            None => None,
        };
        let traces = async {
            match genai {
                Some(genai) => genai.run(shutdown.clone()).await,
                None => Ok(()),
            }
        };
        starting.done();
        tracing::info!(listen = %config.listen, prefix = subjects.prefix(), "event ingest started");
        let persist = persister::run(
            js,
            subjects,
            pool.clone(),
            activity,
            config.batch_max,
            config.max_diff_bytes,
            shutdown.clone(),
        );
        let serve = async {
            let server = axum::serve(self.listener, http::router(state, config.max_body_bytes))
                .with_graceful_shutdown(shutdown.clone().cancelled_owned());
            // Graceful, but bounded: a client holding a live tail open must
            // not hold the shutdown forever.
            let grace = async {
                shutdown.cancelled().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            };
            tokio::select! {
                served = server => served.map_err(|error| Error::Listen {
                    addr: config.listen.clone(),
                    error,
                }),
                _ = grace => {
                    tracing::warn!("connections still open 5 s after shutdown; leaving them");
                    Ok(())
                }
            }
        };
        let result = tokio::try_join!(persist, serve, webhooks.run(), traces);
        shutdown.cancel();
        pool.close().await;
        let _ = nats.flush().await;
        result.map(|_| ())
    }
}

/// Binds and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    Bound::bind(config).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_in_use_is_said_once() {
        // What `corral-event-ingest`'s main prints: anyhow's Debug, the
        // message and its "Caused by" list.
        let err = super::Error::Listen {
            addr: "127.0.0.1:7070".into(),
            error: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let report = format!("{:?}", anyhow::Error::from(err));
        assert_eq!(report.matches("address in use").count(), 1, "{report}");
        assert!(!report.contains("Caused by"), "{report}");
    }
}
