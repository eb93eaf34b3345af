//! Sandbox providers: one trait ([`Provider`]) and its implementations.
//!
//! A provider creates sandboxes carrying labels (at least
//! [`LABEL_RUN_ID`] and [`LABEL_DEPLOYMENT`], so that a reconciler can match
//! what the provider lists against the records even when a record lacks the
//! sandbox id), runs commands in them with streamed output, and kills, pauses,
//! resumes, probes and lists them. Every operation is idempotent where the
//! provider allows: killing a sandbox that is already gone is
//! [`KillOutcome::AlreadyGone`], not an error.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

mod connect;
pub mod daytona;
pub mod e2b;
pub mod local;
mod remote;

pub use daytona::{DaytonaConfig, DaytonaProvider};
pub use e2b::{E2bConfig, E2bProvider};
pub use local::{Isolation, LocalConfig, LocalProvider, Network};

/// The provider named `name` (`local`, `e2b`, `daytona`): local sandboxes
/// under `home` (refused when `local` asks for isolation this machine
/// cannot give), remote ones with their settings; an empty API key is taken
/// from `E2B_API_KEY` or `DAYTONA_API_KEY`.
pub fn build(
    name: &str,
    home: &std::path::Path,
    local: &LocalConfig,
    e2b: &E2bConfig,
    daytona: &DaytonaConfig,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    Ok(match name {
        "" | "local" => std::sync::Arc::new(LocalProvider::new(home, local)?),
        "e2b" => std::sync::Arc::new(E2bProvider::new(e2b.clone().with_env_api_key())?),
        "daytona" => std::sync::Arc::new(DaytonaProvider::new(daytona.clone().with_env_api_key())?),
        other => {
            return Err(ProviderError::Invalid(format!(
                "unknown provider {other:?}: use local, e2b or daytona"
            )));
        }
    })
}

/// Label naming the run a sandbox belongs to.
pub const LABEL_RUN_ID: &str = "corral.run_id";
/// Label naming the corral deployment (its subject prefix) that made it.
pub const LABEL_DEPLOYMENT: &str = "corral.deployment";
/// Label naming the node that holds a node-local (local provider) sandbox.
pub const LABEL_NODE: &str = "corral.node";
/// Label `none` on a sandbox that is not isolated (`local.isolation: none`).
pub const LABEL_ISOLATION: &str = "corral.isolation";
/// A remote create's own id, so that a create whose answer was lost (a
/// timeout, a dropped connection) is found and adopted instead of made twice.
pub const LABEL_CREATE: &str = "corral.create";

pub type Labels = BTreeMap<String, String>;

/// What to create.
#[derive(Clone, Debug, Default)]
pub struct CreateSpec {
    pub run_id: String,
    pub labels: Labels,
    /// Address-space limit per process, MiB.
    pub memory_mib: u64,
    /// CPU-time limit per process, seconds.
    pub cpu_secs: u64,
    /// How long the provider itself may keep the sandbox before it expires
    /// it (a remote provider's timeout; 0 = the provider's default). A
    /// sandbox corral lost track of dies by itself after this.
    pub lifetime_secs: u64,
    /// Resource class (`default`, `large`, ...): the row of the price table
    /// the run is billed at (providers create their configured size).
    pub resource_class: String,
    /// The sandbox's network (`None` = the provider's default). Remote
    /// providers ignore it.
    pub network: Option<Network>,
}

/// A sandbox as the provider knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxInfo {
    pub id: String,
    pub labels: Labels,
    pub created_at_ms: i64,
    pub paused: bool,
}

/// What to run in a sandbox.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Environment of the command; the provider adds only `CORRAL_RUN_ID`,
    /// `CORRAL_SANDBOX_ID`, `PATH`, `HOME` and `LANG`.
    pub env: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One line of a command's output, without its newline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: OutputStream,
    pub line: String,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The exit code as a shell reports it (128 + signal for signals).
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }
}

/// Signals an execution's processes (the whole process group, locally).
pub trait ExecControl: Send + Sync {
    /// Asks the command to stop (SIGTERM).
    fn interrupt(&self);
    /// Ends it now (SIGKILL).
    fn kill(&self);
}

/// A running command: its output lines and its process.
pub struct Execution {
    /// Closed once both output streams ended.
    pub output: mpsc::Receiver<OutputLine>,
    pub process: Process,
}

/// The process (group) of a running command: wait for it, end it.
pub struct Process {
    exit: watch::Receiver<Option<ExitStatus>>,
    control: Box<dyn ExecControl>,
    pid: Option<i32>,
}

impl Process {
    pub fn new(
        exit: watch::Receiver<Option<ExitStatus>>,
        control: Box<dyn ExecControl>,
    ) -> Process {
        Process {
            exit,
            control,
            pid: None,
        }
    }

    /// The same, knowing the process (group) id on this machine.
    pub fn with_pid(self, pid: i32) -> Process {
        Process {
            pid: Some(pid),
            ..self
        }
    }

    /// The process group id, when the command runs on this machine.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Waits for the command to end.
    pub async fn wait(&self) -> ExitStatus {
        let mut exit = self.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(status) => status.unwrap_or(ExitStatus::Signal(libc::SIGKILL)),
            // The waiter is gone only if the process could not be waited for.
            Err(_) => ExitStatus::Signal(libc::SIGKILL),
        }
    }

    /// How it ended, if it has.
    pub fn status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// SIGTERM, then SIGKILL if the command has not ended within `grace`.
    /// Returns how it ended and whether SIGKILL was needed.
    pub async fn terminate(&self, grace: Duration) -> (ExitStatus, bool) {
        self.control.interrupt();
        if let Ok(status) = tokio::time::timeout(grace, self.wait()).await {
            return (status, false);
        }
        self.control.kill();
        (self.wait().await, true)
    }

    /// SIGKILL to the whole group now (also ends stragglers after the main
    /// process exited) and wait.
    pub async fn kill(&self) -> ExitStatus {
        self.control.kill();
        self.wait().await
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillOutcome {
    Killed,
    AlreadyGone,
}

/// Whether a sandbox can be reused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Expired, killed behind corral's back, or otherwise unusable.
    Gone(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("sandbox {0} does not exist")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Worth retrying: the provider was unreachable, slow or overloaded.
    #[error("provider unavailable: {0}")]
    Transient(String),
    #[error("provider failed: {0}")]
    Failed(String),
}

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Transient(_))
    }
}

/// A sandbox provider. Implementations must be safe to call from many tasks
/// and, for `kill` and `list`, from processes other than the creator's.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name: `local`, `e2b`, `daytona`.
    fn name(&self) -> &'static str;

    /// The node whose sandboxes this provider holds, for a node-local
    /// provider: only this node can list, probe and kill them, and their
    /// ids name it (`local::node_of_sandbox`). `None`: any instance anywhere
    /// reaches every sandbox (a remote API).
    fn node(&self) -> Option<&str> {
        None
    }

    /// Creates a sandbox carrying `spec.labels`.
    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError>;

    /// Starts a command in the sandbox.
    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Execution, ProviderError>;

    /// Ends the sandbox and everything in it. Idempotent.
    async fn kill(&self, sandbox_id: &str) -> Result<KillOutcome, ProviderError>;

    async fn pause(&self, sandbox_id: &str) -> Result<(), ProviderError>;

    async fn resume(&self, sandbox_id: &str) -> Result<(), ProviderError>;

    /// Whether the sandbox is still there and usable.
    async fn probe(&self, sandbox_id: &str) -> Result<Health, ProviderError>;

    /// Sandboxes whose labels include every pair in `labels`.
    async fn list(&self, labels: &Labels) -> Result<Vec<SandboxInfo>, ProviderError>;
}
