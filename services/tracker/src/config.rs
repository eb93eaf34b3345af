//! The tracker's configuration: defaults < YAML file < `CORRAL_*`
//! environment < flags (see `corral_common::config`).

use corral_common::Secret;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server, or a cluster's comma-separated seed list (`NATS_URL`).
    pub nats_url: String,
    /// Credentials and TLS for NATS (`nats_auth: {creds_file | nkey_file |
    /// user + password | token, tls_ca, tls_cert, tls_key}`; `NATS_CREDS`, ...).
    pub nats_auth: corral_common::nats::NatsAuth,
    /// JetStream streams: replicas, age, size, discard per stream
    /// (`streams: {commands, lifecycle, events, dead_letters}`).
    pub streams: corral_common::streams::Streams,
    /// PostgreSQL (`DATABASE_URL`).
    pub database_url: Secret,
    /// First token of every subject; lets deployments share one NATS.
    pub subject_prefix: String,
    /// Database connections.
    pub db_pool_size: u32,
    /// Requests handled concurrently.
    pub max_in_flight: usize,
    /// Absolute timeout of runs that do not set one, seconds.
    pub default_timeout_secs: i32,
    /// Inactivity timeout of runs that do not set one, seconds.
    pub default_idle_timeout_secs: i32,
    /// Kept runs: idle seconds before the sandbox is paused, when the run
    /// does not say.
    pub default_idle_pause_secs: i32,
    /// Kept runs: the session's lifetime when the run does not say, seconds.
    pub default_max_lifetime_secs: i32,
    /// Dollars per hour by provider and resource class, running and paused:
    /// `prices: {e2b: {default: {running_per_hour: 0.1089, paused_per_hour: 0}}}`.
    /// A file's table is merged over the defaults, provider by provider and
    /// class by class.
    pub prices: crate::cost::Prices,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            streams: Default::default(),
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/corral"),
            subject_prefix: corral_proto::Subjects::DEFAULT_PREFIX.into(),
            db_pool_size: 16,
            max_in_flight: 256,
            default_timeout_secs: 300,
            default_idle_timeout_secs: 60,
            default_idle_pause_secs: 600,
            default_max_lifetime_secs: 24 * 3600,
            prices: crate::cost::Prices::default(),
        }
    }
}

/// Command-line flags; each overrides the file and the environment.
#[derive(Clone, Debug, Default, Serialize, clap::Args)]
pub struct Flags {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: corral_common::config::CommonFlags,
    /// PostgreSQL URL [env: DATABASE_URL, CORRAL_DATABASE_URL].
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Database connections [env: CORRAL_DB_POOL_SIZE; default 16].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_pool_size: Option<u32>,
}

impl Flags {
    /// Layers defaults, the file, `env` and these flags into a [`Config`].
    pub fn load(
        &self,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Config, corral_common::config::ConfigError> {
        self.common.load(env, self)
    }
}
