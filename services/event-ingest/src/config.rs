//! Event ingest's configuration: defaults < YAML file < `CORRAL_*`
//! environment < flags (see `corral_common::config`).

use std::collections::HashMap;

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
    /// HTTP listen address.
    pub listen: String,
    /// Key of the run tokens (shared with the spawners; `CORRAL_TOKEN_SECRET`),
    /// key id `default`.
    pub token_secret: Secret,
    /// The token keyring by key id (`CORRAL_TOKEN_KEYS__<ID>`): a token is
    /// accepted when the key it names is here.
    pub token_keys: std::collections::BTreeMap<String, Secret>,
    /// Allows weak token keys, and reads without an API key when
    /// `api_keys` is empty (a laptop); never in production.
    pub dev_mode: bool,
    /// Who may read events, by key id: `{sha256, scopes}` (`corral keys
    /// new` prints both; scopes `events:read`, `events:stream`).
    pub api_keys: std::collections::BTreeMap<String, crate::auth::ApiKey>,
    /// Reads without a key while `api_keys` is empty (a laptop's `corral
    /// up` on loopback; dev mode implies it).
    pub anonymous_reads: bool,
    /// Read requests per second per key (beyond the burst: 429).
    pub read_rate_per_sec: u32,
    /// Read requests a key may make at once above its rate.
    pub read_burst: u32,
    /// Live tails (SSE) one key may hold open at once.
    pub max_streams_per_key: u32,
    /// Largest accepted request body, bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Diffs longer than this are stored cut, marked truncated, bytes.
    pub max_diff_bytes: usize,
    /// Events persisted per database transaction, at most.
    pub batch_max: usize,
    /// OTLP/HTTP traces endpoint (`CORRAL_GENAI_TRACES`, e.g.
    /// `http://collector:4318/v1/traces`): when set, every run that ends is
    /// exported there as one GenAI trace (see `genai.rs`); unset: none.
    pub genai_traces: Option<String>,
    /// Database connections.
    pub db_pool_size: u32,
    /// Lifecycle webhooks by endpoint name (`CORRAL_WEBHOOKS__<NAME>__URL`,
    /// `..__SECRET`, ...): every matching run transition is POSTed there as
    /// signed JSON, at least once (see `webhooks.rs`).
    pub webhooks: std::collections::BTreeMap<String, Webhook>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            streams: Default::default(),
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/corral"),
            subject_prefix: corral_proto::Subjects::DEFAULT_PREFIX.into(),
            listen: "127.0.0.1:8470".into(),
            token_secret: Secret::default(),
            token_keys: Default::default(),
            dev_mode: false,
            api_keys: Default::default(),
            anonymous_reads: false,
            read_rate_per_sec: 20,
            read_burst: 40,
            max_streams_per_key: 8,
            max_body_bytes: 1024 * 1024,
            max_diff_bytes: 256 * 1024,
            batch_max: 1000,
            genai_traces: None,
            db_pool_size: 8,
            webhooks: Default::default(),
        }
    }
}

/// One webhook endpoint (`webhooks.<name>`): where, signed with what, and
/// which transitions it wants.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhook {
    /// `http://` or `https://` URL the transitions are POSTed to.
    pub url: String,
    /// Key of the `corral-webhook-signature` HMAC-SHA256 (at least 16 bytes).
    pub secret: Secret,
    /// Only transitions into these states (`running`, `completed`,
    /// `timed_out`, ...); empty: every state.
    pub states: Vec<String>,
    /// Only runs with every one of these labels; empty: every run.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Attempts per transition before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay, ms; doubled per attempt up to `max_backoff_ms`.
    pub backoff_ms: u64,
    /// Longest retry delay, ms.
    pub max_backoff_ms: u64,
    /// A request not answered within this is a failed attempt, ms.
    pub timeout_ms: u64,
    /// Requests in flight to this endpoint at once (over all ingest instances).
    pub max_in_flight: u32,
}

impl Default for Webhook {
    fn default() -> Self {
        Webhook {
            url: String::new(),
            secret: Secret::default(),
            states: Vec::new(),
            labels: Default::default(),
            max_attempts: 8,
            backoff_ms: 1000,
            max_backoff_ms: 60_000,
            timeout_ms: 10_000,
            max_in_flight: 16,
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
