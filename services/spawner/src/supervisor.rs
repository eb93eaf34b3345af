//! One owned run, from claim to a terminal state: create the sandbox, record
//! its id, start (fenced by the tracker), run the agent while publishing its
//! output and watching stop, deadline and inactivity, finalize behind the
//! fence, kill the sandbox, and report the outcome.
//!
//! Promises: the sandbox id is recorded before the run leaves `booting`; the
//! sandbox is killed before the terminal state is reported (a terminal run
//! has no sandbox); a stop heard on the run's stop subject ends the agent
//! with SIGTERM and, after `kill_grace_ms`, SIGKILL to its process group;
//! finalize starts only after the tracker's `running -> finalizing` fence
//! succeeded.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};
use corral_client::ClientError;
use corral_proto::v1::{
    AgentEvent, ContinueCommand, RecordSandboxRequest, Run, RunCommand, RunEvent, RunSpec,
    RunState, StopCommand, TransitionRequest, agent_event, output,
};
use corral_provider::{
    CreateSpec, ExecSpec, ExitStatus, Health, LABEL_DEPLOYMENT, LABEL_RUN_ID, OutputLine,
    OutputStream, ProviderError,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prost::Message;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{Spawner, outcomes};

/// A run this spawner claimed.
pub(crate) struct Start {
    pub command: RunCommand,
    pub run: Run,
}

/// Why an execution ended.
enum Ending {
    Exited(ExitStatus),
    Stopped(StopCommand),
    TimedOut(&'static str),
    Shutdown,
}

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(8)
}

pub(crate) async fn supervise(spawner: &Arc<Spawner>, start: Start) {
    let run_id = start.command.run_id.clone();
    let span = tracing::info_span!("run", run_id = %run_id);
    let argv = start
        .command
        .spec
        .as_ref()
        .map(|s| s.argv.clone())
        .unwrap_or_default();
    Supervisor::new(spawner, start.run, start.command.spec.unwrap_or_default())
        .supervise(argv)
        .instrument(span)
        .await;
}

/// The next turn of a kept run this spawner took (`continue`).
pub(crate) struct Turn {
    pub command: ContinueCommand,
    pub run: Run,
    /// The state the run left: `paused` means resume before anything else.
    pub from: RunState,
}

pub(crate) async fn supervise_turn(spawner: &Arc<Spawner>, turn: Turn) {
    let span = tracing::info_span!("turn", run_id = %turn.run.run_id, turn = turn.run.turn);
    let spec = turn.run.spec.clone().unwrap_or_default();
    let argv = if turn.command.argv.is_empty() {
        spec.argv.clone()
    } else {
        turn.command.argv
    };
    Supervisor::new(spawner, turn.run, spec)
        .continue_turn(turn.from, argv)
        .instrument(span)
        .await;
}

struct Supervisor {
    spawner: Arc<Spawner>,
    run_id: String,
    spec: RunSpec,
    run: Run,
    sandbox_id: Option<String>,
    /// Sequence number of the last output event, across executions.
    seq: std::sync::atomic::AtomicU64,
    /// The agent's session id as it last reported it.
    session_id: std::sync::Mutex<Option<String>>,
}

/// Why a kept sandbox could not be made ready for a turn.
enum NotReady {
    /// The provider could not be asked: the run stays as it is (idle).
    Unavailable(String),
    /// Gone, and the one replacement this turn allows failed.
    Lost(String),
}

impl Supervisor {
    fn new(spawner: &Arc<Spawner>, run: Run, spec: RunSpec) -> Supervisor {
        Supervisor {
            spawner: spawner.clone(),
            run_id: run.run_id.clone(),
            sandbox_id: (!run.sandbox_id.is_empty()).then(|| run.sandbox_id.clone()),
            session_id: std::sync::Mutex::new(
                (!run.session_id.is_empty()).then(|| run.session_id.clone()),
            ),
            spec,
            run,
            seq: Default::default(),
        }
    }

    async fn subscribe_stops(&mut self) -> Option<async_nats::Subscriber> {
        let subject = self.spawner.subjects().cmd_stop(&self.run_id);
        match self.spawner.client.nats().subscribe(subject).await {
            Ok(stops) => Some(stops),
            Err(err) => {
                let reason = format!("cannot subscribe to stops: {err}");
                self.end(RunEvent::Fail, &reason, None).await;
                None
            }
        }
    }

    /// A new run: boot its sandbox, start, run the first turn.
    async fn supervise(mut self, argv: Vec<String>) {
        let Some(mut stops) = self.subscribe_stops().await else {
            return;
        };
        // Booting: create the sandbox and record its id durably.
        if let Err(reason) = self.create_sandbox("").await {
            self.end(RunEvent::Fail, &reason, None).await;
            return;
        }
        let boot_delay = Duration::from_millis(self.spawner.config.boot_delay_ms);
        if !boot_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(boot_delay) => {}
                _ = self.spawner.end_runs.cancelled() => {
                    self.end(RunEvent::Fail, "spawner_shutdown", None).await;
                    return;
                }
                Some(message) = stops.next() => {
                    let stop = StopCommand::decode(message.payload).unwrap_or_default();
                    self.end(RunEvent::Stop, &stop_reason(&stop), None).await;
                    return;
                }
            }
        }
        // A stop heard while booting: the sandbox dies as soon as it exists.
        if let Some(stop) = pending_stop(&mut stops) {
            self.end(RunEvent::Stop, &stop_reason(&stop), None).await;
            return;
        }
        match self.transition(RunEvent::Start, "", None).await {
            Ok(run) => self.run = run,
            Err(err) => {
                self.refused(err).await;
                return;
            }
        }
        self.turn(argv, &mut stops).await;
    }

    /// The next turn of a kept run: make its sandbox ready (resume, probe,
    /// replace once), then run the turn.
    async fn continue_turn(mut self, from: RunState, argv: Vec<String>) {
        let Some(mut stops) = self.subscribe_stops().await else {
            return;
        };
        match self.ready_sandbox(from).await {
            Ok(()) => {}
            Err(NotReady::Unavailable(why)) => {
                let reason = format!("turn not run: {why}");
                self.turn_end(&reason, None).await;
                return;
            }
            Err(NotReady::Lost(why)) => {
                self.end(RunEvent::Fail, &why, None).await;
                return;
            }
        }
        if let Some(stop) = pending_stop(&mut stops) {
            self.end(RunEvent::Stop, &stop_reason(&stop), None).await;
            return;
        }
        self.turn(argv, &mut stops).await;
    }

    /// Creates a sandbox and records its id (`replaced_because` says why
    /// when it replaces a gone one). On failure, returns the run's reason;
    /// a sandbox that exists is in `self.sandbox_id`, for `end` to kill.
    async fn create_sandbox(&mut self, replaced_because: &str) -> Result<(), String> {
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
    async fn ready_sandbox(&mut self, from: RunState) -> Result<(), NotReady> {
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
        self.create_sandbox(&because).await.map_err(|err| {
            NotReady::Lost(format!(
                "sandbox gone ({why}) and its replacement failed: {err}"
            ))
        })
    }

    /// Runs one turn: the agent, then (for a run that is not kept) finalize
    /// and the end, or (for a kept run) back to idle.
    async fn turn(&mut self, argv: Vec<String>, stops: &mut async_nats::Subscriber) {
        let Some(sandbox_id) = self.sandbox_id.clone() else {
            self.end(RunEvent::Fail, "no sandbox to run in", None).await;
            return;
        };
        let mut env: std::collections::BTreeMap<String, String> =
            self.spec.env.clone().into_iter().collect();
        env.insert("CORRAL_RUN_ID".into(), self.run_id.clone());
        env.insert("CORRAL_TURN".into(), self.run.turn.to_string());
        if let Some(session) = self.session_id.lock().ok().and_then(|s| s.clone()) {
            env.insert("CORRAL_SESSION_ID".into(), session);
        }
        if let Some(keyring) = &self.spawner.keyring {
            // Valid until a minute past the deadline: the run is over by then.
            let expires = self.run.deadline_at_ms.max(corral_common::now_ms()) + 60_000;
            let token = keyring.mint(&self.run_id, expires);
            env.insert("CORRAL_TOKEN".into(), token);
            env.insert(
                "CORRAL_EVENTS_URL".into(),
                self.spawner.config.events_url.clone(),
            );
        }
        let exec = ExecSpec {
            argv,
            env: env.clone(),
        };
        let kept = self.spec.keep_alive;
        let ending = match self.spawner.provider.exec(&sandbox_id, &exec).await {
            Ok(execution) => self.watch(execution, stops, true, kept).await,
            Err(err) if kept => {
                let reason = format!("turn did not start: {err}");
                self.turn_end(&reason, Some(127)).await;
                return;
            }
            Err(err) => {
                self.end(
                    RunEvent::Fail,
                    &format!("agent did not start: {err}"),
                    Some(127),
                )
                .await;
                return;
            }
        };
        let killed = matches!(ending, Ending::Exited(ExitStatus::Signal(s)) if s == libc::SIGKILL);
        // A kept run's turn killed with the run going on (a resource limit)
        // fails the turn, not the session.
        let session_goes_on = kept && killed && self.goes_on().await;
        match ending {
            // Killed by someone else (the reaper, an operator): let the
            // record say why, if it knows.
            Ending::Exited(_) if killed && !session_goes_on => {
                let err = ClientError::Invalid("the agent was killed with SIGKILL".into());
                self.refused(err).await;
            }
            Ending::Exited(status) if kept => {
                let reason = if status.success() {
                    String::new()
                } else {
                    format!("turn failed: {}", describe(status))
                };
                self.turn_end(&reason, Some(status.code())).await;
            }
            // A spawner going away (a deploy) interrupts the turn, not the
            // session: the sandbox stays for the next continue.
            Ending::Shutdown if kept => {
                self.turn_end("turn interrupted: spawner shut down", None)
                    .await;
            }
            Ending::Exited(status) if status.success() && !self.spec.finalize.is_empty() => {
                self.finalize(&sandbox_id, env, stops).await;
            }
            Ending::Exited(status) if status.success() => {
                self.end(RunEvent::Complete, "", Some(0)).await;
            }
            ending => self.end_as(ending).await,
        }
    }

    /// Whether the record lets the run go on: not ended, no stop asked, its
    /// deadline ahead.
    async fn goes_on(&self) -> bool {
        self.spawner
            .client
            .get(&self.run_id)
            .await
            .is_ok_and(|run| {
                !run.state().is_terminal()
                    && run.stop_requested_at_ms == 0
                    && (run.deadline_at_ms == 0 || run.deadline_at_ms > corral_common::now_ms())
            })
    }

    /// A kept run's turn is over: `running -> idle`, the sandbox stays, the
    /// session id is recorded for the next turn. Refused once a stop was
    /// requested: then the run ends as the fence says.
    async fn turn_end(&mut self, reason: &str, exit_code: Option<i32>) {
        let session_id = self
            .session_id
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .unwrap_or_default();
        let request = TransitionRequest {
            run_id: self.run_id.clone(),
            event: RunEvent::TurnEnd as i32,
            reason: reason.to_owned(),
            actor: self.spawner.actor.clone(),
            exit_code,
            expected_version: 0,
            session_id,
            owner: self.spawner.id.clone(),
        };
        match outcomes::record(&self.spawner, &request).await {
            Ok(run) => self.run = run,
            Err(err) if err.is_transient() => {
                // Kept on disk: the spawner is exiting.
                tracing::warn!(error = %err, "turn end not recorded before exit");
            }
            Err(err) => self.refused(err).await,
        }
    }

    /// Finalize only through the fence: `running -> finalizing` is refused
    /// once a stop was requested or the deadline passed.
    async fn finalize(
        &mut self,
        sandbox_id: &str,
        env: std::collections::BTreeMap<String, String>,
        stops: &mut async_nats::Subscriber,
    ) {
        if let Err(err) = self.transition(RunEvent::BeginFinalize, "", None).await {
            self.refused(err).await;
            return;
        }
        let exec = ExecSpec {
            argv: vec!["sh".into(), "-c".into(), self.spec.finalize.clone()],
            env,
        };
        let ending = match self.spawner.provider.exec(sandbox_id, &exec).await {
            Ok(execution) => self.watch(execution, stops, false, false).await,
            Err(err) => {
                self.end(
                    RunEvent::Fail,
                    &format!("finalize did not start: {err}"),
                    Some(127),
                )
                .await;
                return;
            }
        };
        match ending {
            Ending::Exited(status) if status.success() => {
                self.end(RunEvent::Complete, "finalized", Some(0)).await;
            }
            Ending::Exited(status) => {
                let reason = format!("finalize failed: {}", describe(status));
                self.end(RunEvent::Fail, &reason, Some(status.code())).await;
            }
            ending => self.end_as(ending).await,
        }
    }

    /// Runs one execution to its end: publishes output, resets the
    /// inactivity timer on output, notes the session id the agent reports,
    /// and ends the process group on a stop (when `stoppable`), a timeout or
    /// shutdown. When the agent exits, what it left running dies with it
    /// unless `keep` (a kept sandbox keeps its background processes).
    async fn watch(
        &self,
        execution: corral_provider::Execution,
        stops: &mut async_nats::Subscriber,
        stoppable: bool,
        keep: bool,
    ) -> Ending {
        let corral_provider::Execution {
            mut output,
            process,
        } = execution;
        // Events the agent (or a trusted service) publishes for this run:
        // progress resets the inactivity window, heartbeats do not.
        let events_subject = self.spawner.subjects().events_of_run(&self.run_id);
        let kind_offset = events_subject.len() - 1;
        let mut events = self
            .spawner
            .client
            .nats()
            .subscribe(events_subject)
            .await
            .ok();
        let mut publisher = Publisher::new(
            self.spawner.client.jetstream().clone(),
            self.spawner.subjects(),
            &self.run_id,
            self.run.turn,
            self.seq.load(std::sync::atomic::Ordering::Relaxed),
        );
        let deadline = instant_of(self.run.deadline_at_ms);
        let idle = Duration::from_secs(self.run.idle_timeout_secs.max(1) as u64);
        let mut idle_at = Instant::now() + idle;
        let mut output_open = true;
        let ending = loop {
            tokio::select! {
                biased;
                stop = stops.next() => {
                    let Some(message) = stop else { continue };
                    let stop = StopCommand::decode(message.payload).unwrap_or_default();
                    if stoppable {
                        break Ending::Stopped(stop);
                    }
                    tracing::info!(reason = %stop.reason, "stop during finalize: finalize already in progress");
                }
                _ = tokio::time::sleep_until(deadline) => break Ending::TimedOut("deadline"),
                _ = tokio::time::sleep_until(idle_at) => break Ending::TimedOut("inactivity"),
                _ = self.spawner.end_runs.cancelled() => break Ending::Shutdown,
                line = output.recv(), if output_open => match line {
                    Some(line) => {
                        idle_at = Instant::now() + idle;
                        self.spawner.note_activity(&self.run_id);
                        publisher.publish(line);
                    }
                    None => output_open = false,
                },
                Some(event) = next_event(&mut events) => {
                    let kind = event.subject.get(kind_offset..).unwrap_or("");
                    if kind != "agent.output" && corral_proto::kinds::is_progress(kind) {
                        idle_at = Instant::now() + idle;
                        self.spawner.note_activity(&self.run_id);
                    }
                    if let Some(session) = session_of(kind, &event.payload)
                        && let Ok(mut current) = self.session_id.lock()
                    {
                        *current = Some(session);
                    }
                }
                status = process.wait() => break Ending::Exited(status),
            }
        };
        let grace = Duration::from_millis(self.spawner.config.kill_grace_ms);
        match &ending {
            // A kept sandbox keeps what the agent left running.
            Ending::Exited(_) if keep => {}
            // Stragglers of an exited agent go with it.
            Ending::Exited(_) => {
                process.kill().await;
            }
            _ => {
                let started = std::time::Instant::now();
                let (status, escalated) = process.terminate(grace).await;
                let how = if escalated { "sigkill" } else { "sigterm" };
                metrics::counter!("corral_agent_terminations_total", "how" => how).increment(1);
                metrics::histogram!("corral_cancellation_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(
                    status = %describe(status),
                    escalated,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "agent ended"
                );
            }
        }
        // The rest of the output, bounded: a process outside the group could
        // hold the pipe open.
        if output_open {
            let drain = async {
                while let Some(line) = output.recv().await {
                    publisher.publish(line);
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        let seq = publisher.flush().await;
        self.seq.store(seq, std::sync::atomic::Ordering::Relaxed);
        ending
    }

    async fn end_as(&mut self, ending: Ending) {
        match ending {
            Ending::Exited(status) => {
                let reason = describe(status);
                self.end(RunEvent::Fail, &reason, Some(status.code())).await;
            }
            Ending::Stopped(stop) => {
                self.kill_sandbox().await;
                // From the stop's request (its publisher's clock) to the
                // sandbox gone.
                if stop.requested_at_ms > 0 {
                    let waited = (corral_common::now_ms() - stop.requested_at_ms).max(0);
                    metrics::histogram!("corral_stop_seconds").record(waited as f64 / 1000.0);
                }
                self.end(RunEvent::Stop, &stop_reason(&stop), None).await
            }
            Ending::TimedOut(kind) => self.end(RunEvent::TimeOut, kind, None).await,
            Ending::Shutdown => self.end(RunEvent::Fail, "spawner_shutdown", None).await,
        }
    }

    /// The tracker refused a fenced transition: end the run as the fence says.
    async fn refused(&mut self, err: ClientError) {
        let current = self.spawner.client.get(&self.run_id).await;
        match current {
            Ok(run) if run.state().is_terminal() => {
                self.kill_sandbox().await;
            }
            Ok(run) if run.stop_requested_at_ms > 0 => {
                let reason = if run.stop_reason.is_empty() {
                    "stop requested".to_owned()
                } else {
                    run.stop_reason.clone()
                };
                self.end(RunEvent::Stop, &reason, None).await;
            }
            Ok(run) if run.deadline_at_ms > 0 && run.deadline_at_ms <= corral_common::now_ms() => {
                self.end(RunEvent::TimeOut, "deadline", None).await;
            }
            _ => {
                self.end(RunEvent::Fail, &format!("tracker refused: {err}"), None)
                    .await;
            }
        }
    }

    /// Kills the sandbox, then records the end: retried until the tracker
    /// takes it, however long it is away ([`outcomes::record`]).
    async fn end(&mut self, event: RunEvent, reason: &str, exit_code: Option<i32>) {
        self.kill_sandbox().await;
        let request = self.request(event, reason, exit_code);
        match outcomes::record(&self.spawner, &request).await {
            Ok(run) => self.run = run,
            Err(err) => {
                tracing::warn!(event = event.name(), error = %err, "terminal transition failed");
            }
        }
    }

    async fn kill_sandbox(&mut self) {
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

    /// This owner's transition request for `event`.
    fn request(&self, event: RunEvent, reason: &str, exit_code: Option<i32>) -> TransitionRequest {
        TransitionRequest {
            run_id: self.run_id.clone(),
            event: event as i32,
            reason: reason.to_owned(),
            actor: self.spawner.actor.clone(),
            exit_code,
            // The tracker takes an end, start or finalize of an owned run
            // only from its owner (or the reaper).
            owner: self.spawner.id.clone(),
            ..Default::default()
        }
    }

    async fn transition(
        &self,
        event: RunEvent,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<Run, ClientError> {
        let request = self.request(event, reason, exit_code);
        let client = &self.spawner.client;
        outcomes::until_answered(&self.spawner, event.name(), || client.transition(&request)).await
    }

    fn labels(&self) -> corral_provider::Labels {
        let mut labels: corral_provider::Labels = self.spec.labels.clone().into_iter().collect();
        labels.insert(LABEL_RUN_ID.into(), self.run_id.clone());
        labels.insert(LABEL_DEPLOYMENT.into(), self.spawner.deployment.clone());
        labels
    }
}

/// The next message of an optional subscription (never, without one).
async fn next_event(events: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// The session id an `agent.started` or `agent.completed` event reports.
fn session_of(kind: &str, payload: &[u8]) -> Option<String> {
    if kind != "agent.started" && kind != "agent.completed" {
        return None;
    }
    let session = match AgentEvent::decode(payload).ok()?.payload? {
        agent_event::Payload::Started(started) => started.session_id,
        agent_event::Payload::Completed(completed) => completed.session_id,
        _ => return None,
    };
    (!session.is_empty()).then_some(session)
}

/// A stop already delivered to the subscription, if any.
fn pending_stop(stops: &mut async_nats::Subscriber) -> Option<StopCommand> {
    use futures::FutureExt;
    let message = stops.next().now_or_never()??;
    Some(StopCommand::decode(message.payload).unwrap_or_default())
}

fn stop_reason(stop: &StopCommand) -> String {
    if stop.reason.is_empty() {
        "stop requested".into()
    } else {
        stop.reason.clone()
    }
}

fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(code) => format!("exit code {code}"),
        ExitStatus::Signal(signal) => format!("killed by signal {signal}"),
    }
}

fn nonzero(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}

/// The monotonic instant of a wall-clock time in Unix ms (far future if 0).
fn instant_of(at_ms: i64) -> Instant {
    if at_ms <= 0 {
        return Instant::now() + Duration::from_secs(365 * 24 * 3600);
    }
    let remaining = at_ms - corral_common::now_ms();
    Instant::now() + Duration::from_millis(remaining.max(0) as u64)
}

/// How many output lines wait for NATS at most; past it the newest are
/// dropped, counted and announced.
const OUTPUT_BUFFER: usize = 8192;
/// Publishes in flight at once.
const OUTPUT_WINDOW: usize = 256;
/// How long the end of an execution waits for its output to reach the
/// stream (a NATS restart of up to ten seconds loses nothing).
const OUTPUT_FLUSH: Duration = Duration::from_secs(20);

/// Publishes output lines as `agent.output` events, at least once: each
/// line gets a stable id (`out-<turn>-<seq>`, and `Nats-Msg-Id`
/// `<run_id>:<id>`), and a publish that fails or is not acknowledged is sent
/// again with the same id until the stream takes it (the stream's duplicate
/// window and the event store's key drop repeats). Lines wait in a bounded
/// buffer; when it is full the newest are dropped, counted
/// (`corral_output_dropped_total`) and announced by an `agent.error` event.
struct Publisher {
    run_id: String,
    turn: u32,
    seq: u64,
    /// Lines dropped since the last announcement.
    dropped: u64,
    lines: Option<tokio::sync::mpsc::Sender<AgentEvent>>,
    relay: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn new(
        js: jetstream::Context,
        subjects: &corral_proto::Subjects,
        run_id: &str,
        turn: u32,
        seq: u64,
    ) -> Publisher {
        let (lines, rx) = tokio::sync::mpsc::channel(OUTPUT_BUFFER);
        let relay = OutputRelay {
            js,
            subject: subjects.events(run_id, "agent.output"),
            errors: subjects.events(run_id, "agent.error"),
            window: FuturesUnordered::new(),
        };
        Publisher {
            run_id: run_id.to_owned(),
            turn,
            seq,
            dropped: 0,
            lines: Some(lines),
            relay: tokio::spawn(relay.run(rx).in_current_span()),
        }
    }

    fn event(&mut self, kind: &str, payload: agent_event::Payload) -> AgentEvent {
        self.seq += 1;
        AgentEvent {
            event_id: format!("out-{}-{}", self.turn, self.seq),
            run_id: self.run_id.clone(),
            seq: self.seq,
            at_ms: corral_common::now_ms(),
            kind: kind.into(),
            payload: Some(payload),
        }
    }

    /// Queues a line; never waits (the run's stop and deadline do not wait
    /// on NATS).
    fn publish(&mut self, line: OutputLine) {
        let Some(lines) = self.lines.clone() else {
            return;
        };
        if self.dropped > 0 && lines.capacity() >= 2 {
            self.announce_dropped(&lines);
        }
        let stream = match line.stream {
            OutputStream::Stdout => output::Stream::Stdout,
            OutputStream::Stderr => output::Stream::Stderr,
        };
        let event = self.event(
            "agent.output",
            agent_event::Payload::Output(corral_proto::v1::Output {
                stream: stream as i32,
                line: line.line,
            }),
        );
        if lines.try_send(event).is_err() {
            self.dropped += 1;
            metrics::counter!("corral_output_dropped_total").increment(1);
        }
    }

    /// The event that says how many lines were dropped since the last one.
    fn dropped_event(&mut self) -> AgentEvent {
        let message = format!(
            "{} output lines dropped: NATS took them slower than the agent printed ({OUTPUT_BUFFER} lines buffered)",
            self.dropped
        );
        tracing::warn!(run_id = %self.run_id, dropped = self.dropped, "output lines dropped");
        self.event(
            "agent.error",
            agent_event::Payload::Error(corral_proto::v1::Error { message }),
        )
    }

    fn announce_dropped(&mut self, lines: &tokio::sync::mpsc::Sender<AgentEvent>) {
        let event = self.dropped_event();
        match lines.try_send(event) {
            Ok(()) => self.dropped = 0,
            // Said at the next chance.
            Err(_) => self.seq -= 1,
        }
    }

    /// Waits until every queued line reached the stream, up to
    /// `OUTPUT_FLUSH`; returns the last sequence number used.
    async fn flush(mut self) -> u64 {
        let deadline = tokio::time::Instant::now() + OUTPUT_FLUSH;
        if let Some(lines) = self.lines.take()
            && self.dropped > 0
            && let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, lines.reserve()).await
        {
            permit.send(self.dropped_event());
            self.dropped = 0;
        }
        if tokio::time::timeout_at(deadline, &mut self.relay)
            .await
            .is_err()
        {
            self.relay.abort();
            metrics::counter!("corral_output_unsent_total").increment(1);
            tracing::error!(run_id = %self.run_id, "output not all acknowledged within {OUTPUT_FLUSH:?}: NATS is away");
        }
        self.seq
    }
}

type Sent = std::pin::Pin<Box<dyn std::future::Future<Output = (AgentEvent, bool)> + Send>>;

/// Sends queued events and sends again, with the same id, what the stream
/// did not acknowledge.
struct OutputRelay {
    js: jetstream::Context,
    subject: String,
    errors: String,
    window: FuturesUnordered<Sent>,
}

impl OutputRelay {
    async fn run(mut self, mut lines: tokio::sync::mpsc::Receiver<AgentEvent>) {
        let mut open = true;
        let mut retry: Vec<AgentEvent> = Vec::new();
        let mut delay = Duration::from_millis(100);
        loop {
            if !retry.is_empty() && self.window.is_empty() {
                // Everything in flight has settled: send the failed ones
                // again, in order, after a pause.
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                retry.sort_by_key(|e| e.seq);
                for event in std::mem::take(&mut retry) {
                    self.send(event).await;
                }
                continue;
            }
            tokio::select! {
                Some((event, acked)) = self.window.next(), if !self.window.is_empty() => {
                    if acked {
                        delay = Duration::from_millis(100);
                    } else {
                        retry.push(event);
                    }
                }
                next = lines.recv(), if open && retry.is_empty() && self.window.len() < OUTPUT_WINDOW => {
                    match next {
                        Some(event) => self.send(event).await,
                        None => open = false,
                    }
                }
                else => return,
            }
        }
    }

    async fn send(&mut self, event: AgentEvent) {
        let mut headers = async_nats::HeaderMap::new();
        let msg_id = format!("{}:{}", event.run_id, event.event_id);
        headers.insert(corral_proto::headers::MSG_ID, msg_id.as_str());
        let subject = if event.kind == "agent.error" {
            self.errors.clone()
        } else {
            self.subject.clone()
        };
        let published = self
            .js
            .publish_with_headers(subject, headers, event.encode_to_vec().into())
            .await;
        match published {
            Ok(ack) => self.window.push(Box::pin(async move {
                let acked = ack.await;
                if let Err(err) = &acked {
                    tracing::debug!(error = %err, "output event not acknowledged; sending it again");
                }
                (event, acked.is_ok())
            })),
            Err(err) => {
                tracing::debug!(error = %err, "output event publish failed; sending it again");
                self.window.push(Box::pin(std::future::ready((event, false))));
            }
        }
    }
}
