//! The run's sandbox at the provider: created and recorded, made ready
//! for a kept run's next turn (resumed, probed, replaced once), killed.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use corral_proto::v1::{RecordSandboxRequest, RunState};
use corral_provider::{CreateSpec, Health, LABEL_DEPLOYMENT, LABEL_RUN_ID, ProviderError};

use super::Supervisor;
use crate::outcomes;

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(8)
}

/// Why a kept sandbox could not be made ready for a turn.
pub(super) enum NotReady {
    /// The provider could not be asked: the run stays as it is (idle).
    Unavailable(String),
    /// Gone, and the one replacement this turn allows failed.
    Lost(String),
}

impl Supervisor {
    /// Creates a sandbox and records its id (`replaced_because` says why
    /// when it replaces a gone one); with `start`, the same request starts
    /// the run (`self.run` says whether it did). On failure, returns the run's reason;
    /// a sandbox that exists is in `self.sandbox_id`, for `end` to kill.
    pub(super) async fn create_sandbox(
        &mut self,
        replaced_because: &str,
        start: bool,
    ) -> Result<(), String> {
        let create = CreateSpec {
            run_id: self.run_id.clone(),
            labels: self.labels(),
            memory_mib: nonzero(self.spec.memory_mib, self.spawner.config.memory_mib),
            cpu_secs: nonzero(
                self.spec.cpu_secs,
                nonzero(
                    self.spawner.config.cpu_secs,
                    self.run.timeout_secs.max(1) as u64,
                ),
            ),
            // The provider expires it a little after the run's deadline.
            lifetime_secs: self.run.timeout_secs.max(1) as u64 + 300,
            resource_class: self.run.resource_class.clone(),
            // Validated at the edge: "" is the provider's default.
            network: corral_provider::Network::parse(&self.spec.network).unwrap_or_default(),
        };
        let provider = self.spawner.provider.clone();
        // Remote providers retry transient failures inside each call; a
        // few more attempts here, not many: every create whose answer was
        // lost leaves a sandbox for the reaper to find.
        let sandbox = (|| provider.create(&create))
            .retry(retry_policy().with_max_times(2))
            .when(|e| e.is_transient())
            .await
            .map_err(|err| format!("sandbox create failed: {err}"))?;
        self.sandbox_id = Some(sandbox.id.clone());
        tracing::debug!(sandbox_id = %sandbox.id, "sandbox created");
        let isolation = sandbox
            .labels
            .get(corral_provider::LABEL_ISOLATION)
            .cloned()
            .unwrap_or_default();
        if !isolation.is_empty() {
            tracing::warn!(sandbox_id = %sandbox.id, isolation = %isolation, "the run's sandbox is not isolated: its agent can see this machine");
        }
        let record = RecordSandboxRequest {
            run_id: self.run_id.clone(),
            owner: self.spawner.id.clone(),
            sandbox_id: sandbox.id.clone(),
            provider: self.spawner.provider.name().to_owned(),
            replaced_because: replaced_because.to_owned(),
            isolation,
            start,
        };
        let client = &self.spawner.client;
        let run = outcomes::until_answered(&self.spawner, "record sandbox", || {
            client.record_sandbox(&record)
        })
        .await
        .map_err(|err| format!("sandbox id not recorded: {err}"))?;
        self.run = run;
        Ok(())
    }

    /// Health before reuse: a paused sandbox is resumed, every sandbox is
    /// probed, and one that is gone is replaced — once: if the replacement
    /// fails too, the run fails rather than loop.
    pub(super) async fn ready_sandbox(&mut self, from: RunState) -> Result<(), NotReady> {
        let provider = self.spawner.provider.clone();
        let Some(id) = self.sandbox_id.clone() else {
            return self.replace_sandbox("no sandbox recorded").await;
        };
        let mut gone = None;
        if from == RunState::Paused {
            let resumed = (|| provider.resume(&id))
                .retry(retry_policy())
                .when(|e| e.is_transient())
                .await;
            match resumed {
                Ok(()) => {}
                Err(ProviderError::NotFound(_)) => gone = Some("gone while paused".to_owned()),
                Err(err) if err.is_transient() => {
                    return Err(NotReady::Unavailable(err.to_string()));
                }
                Err(err) => gone = Some(format!("resume failed: {err}")),
            }
        }
        if gone.is_none() {
            let probed = (|| provider.probe(&id))
                .retry(retry_policy())
                .when(|e| e.is_transient())
                .await;
            match probed {
                Ok(Health::Healthy) => {}
                Ok(Health::Gone(why)) => gone = Some(why),
                Err(err) => return Err(NotReady::Unavailable(err.to_string())),
            }
        }
        match gone {
            None => Ok(()),
            Some(why) => self.replace_sandbox(&why).await,
        }
    }

    async fn replace_sandbox(&mut self, why: &str) -> Result<(), NotReady> {
        tracing::warn!(sandbox_id = ?self.sandbox_id, why, "kept sandbox gone: replacing it once");
        metrics::counter!("corral_sandboxes_replaced_total").increment(1);
        if let Some(old) = self.sandbox_id.take() {
            // Whatever is left of it (a half-dead sandbox still bills).
            let _ = self.spawner.provider.kill(&old).await;
        }
        if let Ok(mut session) = self.session_id.lock() {
            *session = None;
        }
        let because = format!("sandbox replaced: {why}");
        self.create_sandbox(&because, false).await.map_err(|err| {
            NotReady::Lost(format!(
                "sandbox gone ({why}) and its replacement failed: {err}"
            ))
        })
    }

    pub(super) async fn kill_sandbox(&mut self) {
        let Some(sandbox_id) = self.sandbox_id.take() else {
            return;
        };
        let provider = self.spawner.provider.clone();
        let killed = (|| provider.kill(&sandbox_id))
            .retry(retry_policy())
            .when(|e| e.is_transient())
            .await;
        if let Err(err) = killed {
            // The reaper's reconciliation finds it by its labels.
            tracing::error!(sandbox_id = %sandbox_id, error = %err, "sandbox kill failed");
        }
    }

    fn labels(&self) -> corral_provider::Labels {
        let mut labels: corral_provider::Labels = self.spec.labels.clone().into_iter().collect();
        labels.insert(LABEL_RUN_ID.into(), self.run_id.clone());
        labels.insert(LABEL_DEPLOYMENT.into(), self.spawner.deployment.clone());
        labels
    }
}

fn nonzero(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}
