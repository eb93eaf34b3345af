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
//!
//! The turn flow lives here; what follows an execution is decided in
//! [`outcome`], the sandbox at the provider in [`sandbox`], watching an
//! execution in [`watch`], its output in [`output`].

use std::sync::Arc;
use std::time::Duration;

use corral_client::ClientError;
use corral_proto::v1::{
    ContinueCommand, Run, RunCommand, RunEvent, RunSpec, RunState, StopCommand, TransitionRequest,
};
use corral_provider::{ExecSpec, ExitStatus};
use futures::StreamExt;
use prost::Message;
use tracing::Instrument;

use crate::{Spawner, outcomes};
use outcome::{End, Next};
use sandbox::NotReady;
use watch::Timeout;

mod outcome;
mod output;
mod sandbox;
mod watch;

/// A run this spawner claimed.
pub(crate) struct Start {
    pub command: RunCommand,
    pub run: Run,
}

/// Why an execution ended.
#[derive(Debug)]
enum Ending {
    Exited(ExitStatus),
    Stopped(StopCommand),
    TimedOut(Timeout),
    Shutdown,
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
        // Booting: create the sandbox and record its id durably; with no
        // boot to wait for, the same request starts the run.
        let boot_delay = Duration::from_millis(self.spawner.config.boot_delay_ms);
        if let Err(reason) = self.create_sandbox("", boot_delay.is_zero()).await {
            self.end(RunEvent::Fail, &reason, None).await;
            return;
        }
        let started = self.run.state() == RunState::Running;
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
        // A stop heard while booting: the sandbox dies as soon as it exists,
        // before the agent runs (also when the record started the run).
        if let Some(stop) = pending_stop(&mut stops) {
            self.end(RunEvent::Stop, &stop_reason(&stop), None).await;
            return;
        }
        if !started {
            match self.transition(RunEvent::Start, "", None).await {
                Ok(run) => self.run = run,
                Err(err) => {
                    self.refused(err).await;
                    return;
                }
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
        let run_goes_on = outcome::asks_record(&ending, kept) && self.goes_on().await;
        let has_finalize = !self.spec.finalize.is_empty();
        match outcome::outcome(&ending, kept, has_finalize, run_goes_on) {
            Next::TurnEnd { reason, exit_code } => self.turn_end(&reason, exit_code).await,
            Next::Finalize => self.finalize(&sandbox_id, env, stops).await,
            Next::End(end) => self.end_with(end).await,
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
        self.end_with(outcome::finalize_outcome(&ending)).await;
    }

    /// Carries out how [`outcome`] says the run ends.
    async fn end_with(&mut self, end: End) {
        match end {
            End::AsRecorded { why } => self.refused(ClientError::Invalid(why)).await,
            End::Stopped {
                reason,
                requested_at_ms,
            } => {
                self.kill_sandbox().await;
                // From the stop's request (its publisher's clock) to the
                // sandbox gone.
                if requested_at_ms > 0 {
                    let waited = (corral_common::now_ms() - requested_at_ms).max(0);
                    metrics::histogram!("corral_stop_seconds").record(waited as f64 / 1000.0);
                }
                self.end(RunEvent::Stop, &reason, None).await
            }
            End::Transition {
                event,
                reason,
                exit_code,
            } => self.end(event, &reason, exit_code).await,
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
