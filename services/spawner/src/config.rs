//! The spawner's configuration: defaults < YAML file < `CORRAL_*`
//! environment < flags (see `corral_common::config`).

use std::collections::HashMap;
use std::path::PathBuf;

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
    /// First token of every subject; lets deployments share one NATS.
    pub subject_prefix: String,
    /// Value of the `corral.deployment` label on every sandbox ("" = the
    /// subject prefix). The reaper reconciles sandboxes of its deployment.
    pub deployment: String,
    /// Where local sandboxes live (`CORRAL_HOME`; "" = `$HOME/.corral`).
    pub home: PathBuf,
    /// This instance's id ("" = generated from host, pid and a random part).
    pub spawner_id: String,
    /// Runs owned at once; further commands wait in the queue. Fewer when
    /// the open-file limit leaves room for fewer (six descriptors a run).
    pub max_runs: usize,
    /// Between SIGTERM and SIGKILL when a run is stopped or timed out, ms.
    pub kill_grace_ms: u64,
    /// Address-space limit per sandbox process, MiB (0 = none).
    pub memory_mib: u64,
    /// CPU-time limit per sandbox process, seconds (0 = the run's timeout).
    pub cpu_secs: u64,
    /// How long a command whose claim fails for a transient reason (the
    /// tracker, PostgreSQL or NATS unavailable) is retried, from when it was
    /// first published, before it is dead-lettered, ms.
    pub claim_horizon_ms: u64,
    /// Liveness heartbeat period, ms.
    pub heartbeat_ms: u64,
    /// Drain: after SIGTERM the spawner takes no new command and lets its
    /// runs go on for this long before it ends what is left (`failed`,
    /// reason `spawner_shutdown`; a kept run's turn is interrupted), ms.
    /// Match it to the orchestrator's grace (Kubernetes'
    /// `terminationGracePeriodSeconds`). (Formerly `shutdown_grace_ms`.)
    #[serde(alias = "shutdown_grace_ms")]
    pub drain_timeout_ms: u64,
    /// How long a pulled command may stay unacknowledged before NATS
    /// redelivers it to another spawner (one that died before claiming), ms.
    pub command_ack_wait_ms: u64,
    /// Key of the run tokens handed to agents as `CORRAL_TOKEN` (shared with
    /// event-ingest; `CORRAL_TOKEN_SECRET`), key id `default`. With
    /// `token_keys` too, or instead: empty. None at all: agents get no token.
    pub token_secret: corral_common::Secret,
    /// The token keyring by key id (`CORRAL_TOKEN_KEYS__<ID>`; ids are
    /// lowercased from the environment). Tokens are signed with
    /// `token_signing_key`, or the greatest id.
    pub token_keys: std::collections::BTreeMap<String, corral_common::Secret>,
    /// The key id new tokens are signed with; empty: the greatest id.
    pub token_signing_key: String,
    /// Allows weak token keys (a laptop, `corral up`); never in production.
    pub dev_mode: bool,
    /// Event-ingest's base URL as agents reach it, handed to them as
    /// `CORRAL_EVENTS_URL`.
    pub events_url: String,
    /// Testing aid: a pause while booting, between recording the sandbox id
    /// and starting the agent, to exercise stops and crashes in that phase.
    /// Keep 0 in production.
    pub boot_delay_ms: u64,
    /// Sandbox provider: `local` (process groups under `home`), `e2b` or
    /// `daytona` (their APIs; keys from `E2B_API_KEY` / `DAYTONA_API_KEY`).
    pub provider: String,
    /// Local sandboxes (`local: {isolation, network, node, binds, pids_max,
    /// cpu_millis, file_size_mib, tmp_size_mib, agent_uid, agent_gid}`).
    pub local: corral_provider::LocalConfig,
    /// E2B settings (`e2b: {api_url, template, envd_url, timeout_secs}`).
    pub e2b: corral_provider::E2bConfig,
    /// Daytona settings (`daytona: {api_url, snapshot, auto_stop_minutes, auto_delete_minutes, create_timeout_secs}`).
    pub daytona: corral_provider::DaytonaConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            streams: Default::default(),
            subject_prefix: corral_proto::Subjects::DEFAULT_PREFIX.into(),
            deployment: String::new(),
            home: PathBuf::new(),
            spawner_id: String::new(),
            max_runs: 1024,
            kill_grace_ms: 5000,
            memory_mib: 4096,
            cpu_secs: 0,
            claim_horizon_ms: 600_000,
            heartbeat_ms: 2000,
            drain_timeout_ms: 600_000,
            command_ack_wait_ms: 30_000,
            token_secret: corral_common::Secret::default(),
            token_keys: Default::default(),
            token_signing_key: String::new(),
            dev_mode: false,
            events_url: "http://127.0.0.1:8470".into(),
            boot_delay_ms: 0,
            provider: "local".into(),
            local: Default::default(),
            e2b: Default::default(),
            daytona: Default::default(),
        }
    }
}

impl Config {
    /// `home`, or `$HOME/.corral` when unset.
    pub fn home_dir(&self) -> PathBuf {
        corral_common::config::corral_home(&self.home)
    }

    pub fn deployment_label(&self) -> String {
        corral_common::config::deployment_label(&self.deployment, &self.subject_prefix)
    }

    pub fn spawner_id(&self) -> String {
        corral_common::config::instance_id(&self.spawner_id)
    }
}

/// Command-line flags; each overrides the file and the environment.
#[derive(Clone, Debug, Default, Serialize, clap::Args)]
pub struct Flags {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: corral_common::config::CommonFlags,
    /// Directory for local sandboxes [env: CORRAL_HOME; default ~/.corral].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home: Option<PathBuf>,
    /// Id of this spawner instance [env: CORRAL_SPAWNER_ID; default host-pid-random].
    #[arg(long, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spawner_id: Option<String>,
    /// Runs owned at once, fewer if the open-file limit (raised to the hard
    /// limit at start) has no room for them: 6 a run [env: CORRAL_MAX_RUNS; default 1024].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_runs: Option<usize>,
    /// Grace between SIGTERM and SIGKILL on stop or timeout, ms [env: CORRAL_KILL_GRACE_MS; default 5000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_grace_ms: Option<u64>,
    /// After SIGTERM, how long runs may finish before the rest are ended, ms [env: CORRAL_DRAIN_TIMEOUT_MS; default 600000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
}

impl Flags {
    /// Layers defaults, the file, `env` and these flags into a [`Config`].
    /// `CORRAL_HOME` names the sandbox directory, as everywhere in corral.
    pub fn load(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<Config, corral_common::config::ConfigError> {
        self.common.load(env, self)
    }
}
