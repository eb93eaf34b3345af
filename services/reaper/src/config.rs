//! The reaper's configuration: defaults < YAML file < `CORRAL_*`
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
    /// The `corral.deployment` label of the sandboxes to reconcile ("" = the
    /// subject prefix).
    pub deployment: String,
    /// Where local sandboxes live (`CORRAL_HOME`; "" = `$HOME/.corral`). The
    /// local provider is node-local: run the reaper beside the spawners.
    pub home: PathBuf,
    /// This instance's id ("" = generated).
    pub reaper_id: String,
    /// Between sweeps, ms.
    pub sweep_period_ms: u64,
    /// The leader lease's time to live, ms; a standby takes over within it.
    pub lease_ttl_ms: u64,
    /// A stop the owner has not honoured this long after it was recorded is
    /// carried out by the reaper, ms.
    pub stop_grace_ms: u32,
    /// An owner silent (no heartbeat) this long is lost, ms.
    pub owner_timeout_ms: u32,
    /// A run booting longer than this is stuck, ms.
    pub boot_limit_ms: u32,
    /// Large disruptions: when the runs due as `owner_lost` in one sweep
    /// belong to more than this fraction of the spawners seen in the last
    /// ten minutes (and there are at least `disruption_min_spawners`), the
    /// reaper suspects itself or the network rather than them, and fails a
    /// run as `owner_lost` only once its owner has been silent for
    /// `disruption_grace_ms` (Kubernetes' node controller slows evictions in
    /// the same case).
    pub disruption_fraction: f64,
    pub disruption_min_spawners: u32,
    pub disruption_grace_ms: u32,
    /// A run pending longer than this, with no spawner claiming it (its
    /// command was dead-lettered or lost), is failed (`pending_unclaimed`),
    /// ms; keep it above the spawners' `claim_horizon_ms`.
    pub pending_limit_ms: u32,
    /// Deadlines and inactivity are enforced this long after they passed,
    /// leaving the owner's timers the first move, ms.
    pub backstop_grace_ms: u32,
    /// Sandboxes killed at once.
    pub max_parallel_kills: usize,
    /// Sandbox provider: `local` (process groups under `home`), `e2b` or
    /// `daytona` (their APIs; keys from `E2B_API_KEY` / `DAYTONA_API_KEY`).
    pub provider: String,
    /// Local sandboxes (`local: {isolation, node, ...}`, as the spawners of
    /// this node have them: the node id must match theirs).
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
            reaper_id: String::new(),
            sweep_period_ms: 5000,
            lease_ttl_ms: 10_000,
            stop_grace_ms: 5000,
            owner_timeout_ms: 10_000,
            boot_limit_ms: 60_000,
            disruption_fraction: 0.5,
            disruption_min_spawners: 3,
            disruption_grace_ms: 300_000,
            pending_limit_ms: 900_000,
            backstop_grace_ms: 2000,
            max_parallel_kills: 32,
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

    pub fn reaper_id(&self) -> String {
        if !self.reaper_id.is_empty() {
            return self.reaper_id.clone();
        }
        format!("reaper-{}", corral_common::config::instance_id(""))
    }
}

/// Command-line flags; each overrides the file and the environment.
#[derive(Clone, Debug, Default, Serialize, clap::Args)]
pub struct Flags {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: corral_common::config::CommonFlags,
    /// Directory of local sandboxes [env: CORRAL_HOME; default ~/.corral].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home: Option<PathBuf>,
    /// Id of this reaper instance [env: CORRAL_REAPER_ID].
    #[arg(long, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reaper_id: Option<String>,
    /// Between sweeps, ms [env: CORRAL_SWEEP_PERIOD_MS; default 5000].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_period_ms: Option<u64>,
}

impl Flags {
    pub fn load(
        &self,
        env: &HashMap<String, String>,
    ) -> Result<Config, corral_common::config::ConfigError> {
        self.common.load(env, self)
    }
}
