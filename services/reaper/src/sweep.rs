//! One sweep: act on what the tracker says is due, then reconcile the
//! provider's sandboxes against the live records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_client::{Client, ClientError};
use corral_proto::v1::{
    DueRun, Run, RunEvent, RunState, SessionCommand, SweepRequest, TransitionRequest, due_run::Why,
    session_command,
};
use corral_provider::{
    Health, LABEL_DEPLOYMENT, LABEL_NODE, LABEL_RUN_ID, Labels, Provider, ProviderError,
    SandboxInfo,
};
use futures::StreamExt;

use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("tracker: {0}")]
    Tracker(ClientError),
    #[error("provider: {0}")]
    Provider(ProviderError),
}

corral_common::from_cause!(
    ClientError => SweepError::Tracker,
    ProviderError => SweepError::Provider,
);

/// What one sweep did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub duration: Duration,
    pub stops: usize,
    pub deadlines: usize,
    pub inactivity: usize,
    pub owner_lost: usize,
    pub stuck_boots: usize,
    /// Runs pending past `pending_limit_ms`: no command carries them.
    pub stuck_pending: usize,
    pub orphans_reaped: usize,
    pub sandboxes_lost: usize,
    /// Kept runs idle past their window, handed to the spawners to pause.
    pub idle_pauses: usize,
    /// Actions whose transition lost a race (the run had moved on).
    pub raced: usize,
    /// Runs due on evidence the reaper does not trust yet (right after an
    /// outage, or a large disruption): judged at a later sweep.
    pub deferred: usize,
}

impl Report {
    pub fn acted(&self) -> bool {
        self.stops
            + self.deadlines
            + self.inactivity
            + self.owner_lost
            + self.stuck_boots
            + self.stuck_pending
            + self.orphans_reaped
            + self.sandboxes_lost
            + self.idle_pauses
            > 0
    }
}

pub struct Reaper {
    client: Client,
    provider: Arc<dyn Provider>,
    request: SweepRequest,
    deployment: String,
    actor: String,
    parallel: usize,
    /// Runs whose sandbox was found gone, at the version seen and when:
    /// judged `sandbox_lost` only if still so a grace later.
    suspects: std::sync::Mutex<HashMap<String, (u64, Instant)>>,
    lost_grace: Duration,
    /// Since when every sweep reached the tracker (None: the last failed,
    /// or none ran yet).
    trusted_since: std::sync::Mutex<Option<Instant>>,
    /// How long after that owners' heartbeats, activity reports and boots
    /// are evidence again: an owner timeout and a sweep period.
    evidence_after: Duration,
    disruption_fraction: f64,
    disruption_min_spawners: usize,
    disruption_grace_ms: i64,
}

impl Reaper {
    pub fn new(client: Client, provider: Arc<dyn Provider>, config: &Config, id: &str) -> Reaper {
        Reaper {
            client,
            provider,
            request: SweepRequest {
                stop_grace_ms: config.stop_grace_ms,
                owner_timeout_ms: config.owner_timeout_ms,
                boot_limit_ms: config.boot_limit_ms,
                pending_limit_ms: config.pending_limit_ms,
                backstop_grace_ms: config.backstop_grace_ms,
                // Due runs travel in one reply: a bounded number per sweep.
                limit: 1000,
                include_live: true,
                ..Default::default()
            },
            deployment: config.deployment_label(),
            suspects: Default::default(),
            // An owner kills its sandbox before it records the end: a
            // sandbox gone under a run still live is its owner finishing
            // unless it stays so past a sweep period.
            lost_grace: Duration::from_millis(config.sweep_period_ms.max(1000)),
            actor: format!("reaper:{id}"),
            parallel: config.max_parallel_kills.max(1),
            trusted_since: Default::default(),
            evidence_after: Duration::from_millis(
                config.owner_timeout_ms as u64 + config.sweep_period_ms,
            ),
            disruption_fraction: config.disruption_fraction,
            disruption_min_spawners: config.disruption_min_spawners as usize,
            disruption_grace_ms: config.disruption_grace_ms as i64,
        }
    }

    /// One sweep of the leader: act on what is due and, for a provider any
    /// instance reaches (a remote API), reconcile its list against the
    /// records. A node-local provider's sandboxes are reconciled by each
    /// node's own reapers instead ([`Reaper::reconcile_node`]).
    pub async fn sweep(&self) -> Result<Report, SweepError> {
        let started = Instant::now();
        let node_local = self.provider.node().is_some();
        // Listed before the records are read, so a sandbox created after
        // the listing is never judged an orphan.
        let sandboxes = if node_local {
            None
        } else {
            Some(self.provider.list(&self.deployment_labels()).await?)
        };
        let request = SweepRequest {
            include_live: !node_local,
            ..self.request.clone()
        };
        let (due, live) = match self.client.sweep(&request).await {
            Ok(answer) => answer,
            Err(err) => {
                self.distrust();
                return Err(err.into());
            }
        };

        let mut report = Report::default();
        let due = self.judgeable(due, &mut report).await;
        let outcomes: Vec<(Why, bool)> = futures::stream::iter(due)
            .map(|due| async move {
                let why = due.why();
                (why, self.act(due).await)
            })
            .buffer_unordered(self.parallel)
            .collect()
            .await;
        for (why, applied) in outcomes {
            if !applied {
                report.raced += 1;
                continue;
            }
            match why {
                Why::StopIgnored => report.stops += 1,
                Why::Deadline => report.deadlines += 1,
                Why::Inactivity => report.inactivity += 1,
                Why::OwnerLost => report.owner_lost += 1,
                Why::IdlePause => report.idle_pauses += 1,
                Why::StuckPending => report.stuck_pending += 1,
                Why::StuckBoot | Why::Unspecified => report.stuck_boots += 1,
            }
        }
        if let Some(sandboxes) = sandboxes {
            self.reconcile(&sandboxes, &live, &mut report).await;
        }
        report.duration = started.elapsed();
        metrics::histogram!("corral_reaper_sweep_seconds").record(report.duration.as_secs_f64());
        Ok(report)
    }

    /// The tracker could not be reached: what owners did meanwhile
    /// (heartbeats, activity, boots) may not have been recorded.
    fn distrust(&self) {
        *self.trusted_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether records of the owners' doings are evidence: the tracker has
    /// been reachable for `evidence_after` (this reaper's start counts as
    /// an outage: it knows nothing of the time before).
    fn evidence_holds(&self) -> bool {
        let mut since = self.trusted_since.lock().unwrap_or_else(|p| p.into_inner());
        since.get_or_insert_with(Instant::now).elapsed() >= self.evidence_after
    }

    /// The due runs this sweep may judge. Right after an outage, only
    /// deadlines, ignored stops, pending runs and idle pauses (what the
    /// clock and the stop record decide); the rest wait until owners have
    /// had an owner timeout to heartbeat, report activity and record their
    /// boots. In a large disruption (owners lost are more than
    /// `disruption_fraction` of the spawners), an owner is lost only once
    /// silent for `disruption_grace_ms`.
    async fn judgeable(&self, due: Vec<DueRun>, report: &mut Report) -> Vec<DueRun> {
        let evidence = self.evidence_holds();
        let before = due.len();
        let mut due: Vec<DueRun> = due
            .into_iter()
            .filter(|d| {
                evidence
                    || !matches!(
                        d.why(),
                        Why::OwnerLost | Why::Inactivity | Why::StuckBoot | Why::Unspecified
                    )
            })
            .collect();
        let lost_owners: std::collections::HashSet<String> = due
            .iter()
            .filter(|d| d.why() == Why::OwnerLost)
            .filter_map(|d| d.run.as_ref().map(|r| r.owner.clone()))
            .collect();
        if !lost_owners.is_empty() {
            match self.client.spawners().await {
                Ok(spawners) => {
                    let seen = spawners.len().max(lost_owners.len());
                    let large = seen >= self.disruption_min_spawners
                        && lost_owners.len() as f64 > self.disruption_fraction * seen as f64;
                    if large {
                        let now = corral_common::now_ms();
                        let silent_long: std::collections::HashSet<String> = lost_owners
                            .iter()
                            .filter(|owner| {
                                spawners
                                    .iter()
                                    .find(|s| &&s.spawner_id == owner)
                                    .is_none_or(|s| {
                                        now - s.heartbeat_at_ms >= self.disruption_grace_ms
                                    })
                            })
                            .cloned()
                            .collect();
                        tracing::warn!(
                            lost = lost_owners.len(),
                            spawners = seen,
                            failing_now = silent_long.len(),
                            "large disruption: most spawners look lost; failing only owners silent for disruption_grace_ms"
                        );
                        due.retain(|d| {
                            d.why() != Why::OwnerLost
                                || d.run
                                    .as_ref()
                                    .is_some_and(|r| silent_long.contains(&r.owner))
                        });
                    }
                }
                Err(err) => {
                    // Cannot tell a disruption from a loss: wait.
                    tracing::warn!(error = %err, "spawners not listed; owner_lost judgments wait");
                    due.retain(|d| d.why() != Why::OwnerLost);
                }
            }
        }
        report.deferred = before - due.len();
        if report.deferred > 0 {
            metrics::counter!("corral_reaper_deferred_total").increment(report.deferred as u64);
        }
        due
    }

    /// Reconciles this node's sandboxes (a node-local provider) against the
    /// live records: what every reaper of the node does each period, leader
    /// or not, and first of all when it starts (a node coming back kills
    /// what ended while it was away).
    pub async fn reconcile_node(&self) -> Result<Report, SweepError> {
        let Some(node) = self.provider.node() else {
            return Ok(Report::default());
        };
        let started = Instant::now();
        let mut labels = self.deployment_labels();
        labels.insert(LABEL_NODE.into(), node.to_owned());
        let sandboxes = self.provider.list(&labels).await?;
        let request = SweepRequest {
            include_live: true,
            live_only: true,
            ..self.request.clone()
        };
        let (_, live) = match self.client.sweep(&request).await {
            Ok(answer) => answer,
            Err(err) => {
                self.distrust();
                return Err(err.into());
            }
        };
        let mut report = Report::default();
        self.reconcile(&sandboxes, &live, &mut report).await;
        report.duration = started.elapsed();
        Ok(report)
    }

    fn deployment_labels(&self) -> Labels {
        let mut labels = Labels::new();
        labels.insert(LABEL_DEPLOYMENT.into(), self.deployment.clone());
        labels
    }

    /// Whether this reaper's provider holds the sandbox: any sandbox of a
    /// remote provider; only this node's of a node-local one.
    fn holds(&self, sandbox_id: &str) -> bool {
        match self.provider.node() {
            None => true,
            Some(node) => corral_provider::local::node_of_sandbox(sandbox_id) == Some(node),
        }
    }

    /// A listed sandbox no live run claims is killed; a live run of this
    /// provider whose sandbox (held here) is gone fails with `sandbox_lost`,
    /// or ends `stopped` if a stop was asked for (its owner killed it).
    async fn reconcile(&self, sandboxes: &[SandboxInfo], live: &[Run], report: &mut Report) {
        let live: HashMap<&str, &Run> = live.iter().map(|run| (run.run_id.as_str(), run)).collect();
        let mut listed = std::collections::HashSet::new();
        for sandbox in sandboxes {
            listed.insert(sandbox.id.as_str());
            let run_id = sandbox
                .labels
                .get(LABEL_RUN_ID)
                .map(String::as_str)
                .unwrap_or("");
            let claimed = match live.get(run_id) {
                Some(run) => {
                    run.sandbox_id == sandbox.id
                        || (run.state() == RunState::Booting && run.sandbox_id.is_empty())
                }
                None => false,
            };
            if claimed {
                continue;
            }
            match self.provider.kill(&sandbox.id).await {
                Ok(_) => {
                    tracing::warn!(sandbox_id = %sandbox.id, run_id, reason = "orphan", "orphan sandbox killed");
                    metrics::counter!("corral_orphans_reaped_total").increment(1);
                    report.orphans_reaped += 1;
                }
                Err(err) => {
                    tracing::warn!(sandbox_id = %sandbox.id, error = %err, "orphan kill failed")
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        // Right after an outage an owner may have ended its sandbox and not
        // yet recorded the run's end: no run is judged lost before owners
        // have had the time to.
        let evidence = self.evidence_holds();
        for run in live.values() {
            // A kept run between turns (idle, paused) whose sandbox is gone
            // is not lost: its next continue probes and replaces it.
            let holds_sandbox = matches!(run.state(), RunState::Running | RunState::Finalizing);
            let ours = (run.provider.is_empty() || run.provider == self.provider.name())
                && self.holds(&run.sandbox_id);
            if !evidence
                || !holds_sandbox
                || !ours
                || run.sandbox_id.is_empty()
                || listed.contains(run.sandbox_id.as_str())
            {
                continue;
            }
            // Listed before the records were read: ask again before judging,
            // and judge only a run that stayed so for the grace.
            let Ok(Health::Gone(why)) = self.provider.probe(&run.sandbox_id).await else {
                continue;
            };
            if !self.still_gone_after_grace(run, &mut seen) {
                continue;
            }
            // A run someone asked to stop whose sandbox is gone was stopped:
            // its owner killed the sandbox and could not record the end (a
            // slow tracker, a crash). Ending it `sandbox_lost` would report
            // a failure where the user's stop was honoured.
            if run.stop_requested_at_ms > 0 {
                let reason = stop_reason(run);
                if self.end(run, RunEvent::Stop, reason).await {
                    tracing::warn!(run_id = %run.run_id, sandbox_id = %run.sandbox_id, detail = %why, reason = "stop_ignored", "stopped run's end recorded");
                    metrics::counter!("corral_stops_enforced_total").increment(1);
                }
            } else if self.end(run, RunEvent::Fail, "sandbox_lost").await {
                tracing::warn!(run_id = %run.run_id, sandbox_id = %run.sandbox_id, detail = %why, reason = "sandbox_lost", "run failed");
                metrics::counter!("corral_sandboxes_lost_total").increment(1);
                report.sandboxes_lost += 1;
            }
        }
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|run_id, _| seen.contains(run_id));
    }

    /// Whether the run (its sandbox found gone) was found so at the same
    /// version at least `lost_grace` ago; records it as a suspect if not.
    fn still_gone_after_grace(
        &self,
        run: &Run,
        seen: &mut std::collections::HashSet<String>,
    ) -> bool {
        seen.insert(run.run_id.clone());
        let mut suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        match suspects.get(&run.run_id) {
            Some((version, since)) if *version == run.version => since.elapsed() >= self.lost_grace,
            _ => {
                suspects.insert(run.run_id.clone(), (run.version, Instant::now()));
                false
            }
        }
    }

    /// Kills the judged sandbox, then ends the run at the judged version.
    /// Returns whether the transition applied.
    async fn act(&self, due: DueRun) -> bool {
        let why = due.why();
        let Some(run) = due.run else { return false };
        if why == Why::IdlePause {
            return self.request_pause(&run).await;
        }
        let (event, reason, metric) = match why {
            Why::StopIgnored => (RunEvent::Stop, stop_reason(&run).to_owned(), "stop_ignored"),
            Why::Deadline => (RunEvent::TimeOut, "deadline".into(), "deadline"),
            Why::Inactivity => (RunEvent::TimeOut, "inactivity".into(), "inactivity"),
            Why::OwnerLost => (RunEvent::Fail, "owner_lost".into(), "owner_lost"),
            Why::IdlePause => return false,
            Why::StuckPending => (
                RunEvent::Fail,
                "pending_unclaimed: no spawner claimed it; its command was dead-lettered or lost"
                    .into(),
                "stuck_pending",
            ),
            Why::StuckBoot | Why::Unspecified => {
                (RunEvent::Fail, "stuck_boot".into(), "stuck_boot")
            }
        };
        self.kill_sandboxes_of(&run).await;
        let applied = self.end(&run, event, &reason).await;
        if applied {
            tracing::warn!(run_id = %run.run_id, sandbox_id = %run.sandbox_id, reason = metric, owner = %run.owner, "reaper ended run");
            match why {
                Why::Deadline | Why::Inactivity => {
                    metrics::counter!("corral_timeouts_total", "kind" => metric).increment(1)
                }
                Why::OwnerLost => metrics::counter!("corral_owner_lost_total").increment(1),
                Why::StuckBoot => metrics::counter!("corral_stuck_boots_total").increment(1),
                Why::StuckPending => metrics::counter!("corral_stuck_pending_total").increment(1),
                _ => metrics::counter!("corral_stops_enforced_total").increment(1),
            }
        }
        applied
    }

    /// A kept run idle past its window: the spawners pause it (through the
    /// work queue, holding the run while they call the provider, so a
    /// continue racing the pause never finds its agent frozen).
    async fn request_pause(&self, run: &Run) -> bool {
        // One request per idle period: stamped with the moment the run went
        // idle, the same request from later sweeps (while spawners are slow
        // or down) is dropped by the stream's de-duplication.
        let pause = SessionCommand {
            run_id: run.run_id.clone(),
            action: session_command::Action::Pause as i32,
            requested_by: self.actor.clone(),
            requested_at_ms: run.idle_at_ms,
        };
        match self.client.session(&pause).await {
            Ok(()) => {
                tracing::info!(run_id = %run.run_id, idle_pause_secs = run.idle_pause_secs, "idle pause requested");
                metrics::counter!("corral_idle_pauses_total").increment(1);
                true
            }
            Err(err) => {
                tracing::warn!(run_id = %run.run_id, error = %err, "idle pause not published");
                false
            }
        }
    }

    /// The judged sandbox, or — when no id was recorded — every sandbox
    /// labelled with the run's id.
    async fn kill_sandboxes_of(&self, run: &Run) {
        let ids: Vec<String> = if run.sandbox_id.is_empty() {
            // Of a node-local provider only this node's: another node's is
            // killed by its own reconciliation once the run has ended.
            let mut labels = self.deployment_labels();
            labels.insert(LABEL_RUN_ID.into(), run.run_id.clone());
            match self.provider.list(&labels).await {
                Ok(found) => found.into_iter().map(|s| s.id).collect(),
                Err(err) => {
                    tracing::warn!(run_id = %run.run_id, error = %err, "listing the run's sandboxes failed");
                    Vec::new()
                }
            }
        } else {
            vec![run.sandbox_id.clone()]
        };
        for id in ids {
            if self.holds(&id) {
                if let Err(err) = self.provider.kill(&id).await {
                    tracing::warn!(run_id = %run.run_id, sandbox_id = %id, error = %err, "sandbox kill failed");
                }
                continue;
            }
            // Another node's local sandbox: only that node can kill it. If
            // it does not answer (it is down), it kills the sandbox when it
            // reconciles on its return: the run is ended either way.
            let node = corral_provider::local::node_of_sandbox(&id).unwrap_or_default();
            if let Err(err) =
                crate::node::ask_kill(&self.client, node, &id, &run.run_id, &self.actor).await
            {
                tracing::warn!(run_id = %run.run_id, sandbox_id = %id, node, error = %err, "node did not kill its sandbox; it will when it reconciles");
            }
        }
    }

    async fn end(&self, run: &Run, event: RunEvent, reason: &str) -> bool {
        let request = TransitionRequest {
            run_id: run.run_id.clone(),
            event: event as i32,
            reason: reason.to_owned(),
            actor: self.actor.clone(),
            expected_version: run.version,
            ..Default::default()
        };
        match self.client.transition(&request).await {
            Ok(_) => true,
            Err(err) => {
                tracing::debug!(run_id = %run.run_id, error = %err, "reaper transition did not apply");
                false
            }
        }
    }
}

/// The reason a stopped run ends with: the stop's own, if it gave one.
fn stop_reason(run: &Run) -> &str {
    if run.stop_reason.is_empty() {
        "stop requested"
    } else {
        &run.stop_reason
    }
}
