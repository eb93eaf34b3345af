//! Event ingest's configuration: defaults < YAML file < `CORRAL_*`
//! environment < flags (see `corral_common::config`).

use std::collections::HashMap;

use corral_common::Secret;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS server (`NATS_URL`).
    pub nats_url: String,
    /// PostgreSQL (`DATABASE_URL`).
    pub database_url: Secret,
    /// First token of every subject; lets deployments share one NATS.
    pub subject_prefix: String,
    /// HTTP listen address.
    pub listen: String,
    /// Key of the run tokens (shared with the spawners; `CORRAL_TOKEN_SECRET`).
    pub token_secret: Secret,
    /// Largest accepted request body, bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Diffs longer than this are stored cut, marked truncated, bytes.
    pub max_diff_bytes: usize,
    /// Events persisted per database transaction, at most.
    pub batch_max: usize,
    /// Database connections.
    pub db_pool_size: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/corral"),
            subject_prefix: corral_proto::Subjects::DEFAULT_PREFIX.into(),
            listen: "127.0.0.1:8470".into(),
            token_secret: Secret::default(),
            max_body_bytes: 1024 * 1024,
            max_diff_bytes: 256 * 1024,
            batch_max: 1000,
            db_pool_size: 8,
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
    /// HTTP listen address [env: CORRAL_LISTEN; default 127.0.0.1:8470].
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

impl Flags {
    pub fn load(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<Config, corral_common::config::ConfigError> {
        self.common.load(env, self)
    }
}
