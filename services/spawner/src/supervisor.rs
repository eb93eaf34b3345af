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
use async_nats::jetstream::context::PublishAckFuture;
use backon::{ExponentialBuilder, Retryable};
use corral_client::ClientError;
use corral_proto::v1::{
    AgentEvent, RecordSandboxRequest, Run, RunCommand, RunEvent, RunSpec, StopCommand,
    TransitionRequest, agent_event, output,
};
use corral_provider::{
    CreateSpec, ExecSpec, ExitStatus, LABEL_DEPLOYMENT, LABEL_RUN_ID, OutputLine, OutputStream,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prost::Message;
use tokio::time::Instant;
use tracing::Instrument;

use crate::Spawner;

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
    Supervisor {
        spawner: spawner.clone(),
        spec: start.command.spec.clone().unwrap_or_default(),
        run: start.run,
        run_id,
        sandbox_id: None,
        seq: Default::default(),
    }
    .supervise()
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
}

impl Supervisor {
    async fn supervise(mut self) {
        let subjects = self.spawner.subjects().clone();
        let mut stops = match self
            .spawner
            .client
            .nats()
            .subscribe(subjects.cmd_stop(&self.run_id))
            .await
        {
            Ok(stops) => stops,
            Err(err) => {
                self.end(
                    RunEvent::Fail,
                    &format!("cannot subscribe to stops: {err}"),
                    None,
                )
                .await;
                return;
            }
        };

        // Booting: create the sandbox and record its id durably.
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
            lifetime_secs: 0,
            resource_class: String::new(),
        };
        let provider = self.spawner.provider.clone();
        let created = (|| provider.create(&create))
            .retry(retry_policy())
            .when(|e| e.is_transient())
            .await;
        let sandbox = match created {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.end(
                    RunEvent::Fail,
                    &format!("sandbox create failed: {err}"),
                    None,
                )
                .await;
                return;
            }
        };
        self.sandbox_id = Some(sandbox.id.clone());
        tracing::debug!(sandbox_id = %sandbox.id, "sandbox created");
        let record = RecordSandboxRequest {
            run_id: self.run_id.clone(),
            owner: self.spawner.id.clone(),
            sandbox_id: sandbox.id.clone(),
            provider: self.spawner.provider.name().to_owned(),
        };
        let client = &self.spawner.client;
        let recorded = (|| client.record_sandbox(&record))
            .retry(retry_policy())
            .when(ClientError::is_transient)
            .await;
        if let Err(err) = recorded {
            self.end(
                RunEvent::Fail,
                &format!("sandbox id not recorded: {err}"),
                None,
            )
            .await;
            return;
        }

        let boot_delay = Duration::from_millis(self.spawner.config.boot_delay_ms);
        if !boot_delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(boot_delay) => {}
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

        // Running.
        let mut env: std::collections::BTreeMap<String, String> =
            self.spec.env.clone().into_iter().collect();
        env.insert("CORRAL_RUN_ID".into(), self.run_id.clone());
        let secret = self.spawner.config.token_secret.expose();
        if !secret.is_empty() {
            // Valid until a minute past the deadline: the run is over by then.
            let expires = self.run.deadline_at_ms.max(corral_common::now_ms()) + 60_000;
            let token = corral_common::token::mint(secret.as_bytes(), &self.run_id, expires);
            env.insert("CORRAL_TOKEN".into(), token);
            env.insert(
                "CORRAL_EVENTS_URL".into(),
                self.spawner.config.events_url.clone(),
            );
        }
        let exec = ExecSpec {
            argv: self.spec.argv.clone(),
            env: env.clone(),
        };
        let ending = match self.spawner.provider.exec(&sandbox.id, &exec).await {
            Ok(execution) => self.watch(execution, &mut stops, true).await,
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
        match ending {
            Ending::Exited(status) if status.success() && !self.spec.finalize.is_empty() => {
                self.finalize(&sandbox.id, env, &mut stops).await;
            }
            Ending::Exited(status) if status.success() => {
                self.end(RunEvent::Complete, "", Some(0)).await;
            }
            // Killed by someone else (the reaper, an operator): let the
            // record say why, if it knows.
            Ending::Exited(ExitStatus::Signal(signal)) if signal == libc::SIGKILL => {
                let err = ClientError::Invalid("the agent was killed with SIGKILL".into());
                self.refused(err).await;
            }
            ending => self.end_as(ending).await,
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
            Ok(execution) => self.watch(execution, stops, false).await,
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
    /// inactivity timer on output, and ends the process group on a stop
    /// (when `stoppable`), a timeout or shutdown.
    async fn watch(
        &self,
        execution: corral_provider::Execution,
        stops: &mut async_nats::Subscriber,
        stoppable: bool,
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
                        publisher.publish(line).await;
                    }
                    None => output_open = false,
                },
                Some(event) = next_event(&mut events) => {
                    let kind = event.subject.get(kind_offset..).unwrap_or("");
                    if kind != "agent.output" && corral_proto::kinds::is_progress(kind) {
                        idle_at = Instant::now() + idle;
                        self.spawner.note_activity(&self.run_id);
                    }
                }
                status = process.wait() => break Ending::Exited(status),
            }
        };
        let grace = Duration::from_millis(self.spawner.config.kill_grace_ms);
        match &ending {
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
                    publisher.publish(line).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        publisher.flush().await;
        self.seq
            .store(publisher.seq, std::sync::atomic::Ordering::Relaxed);
        ending
    }

    async fn end_as(&mut self, ending: Ending) {
        match ending {
            Ending::Exited(status) => {
                let reason = describe(status);
                self.end(RunEvent::Fail, &reason, Some(status.code())).await;
            }
            Ending::Stopped(stop) => self.end(RunEvent::Stop, &stop_reason(&stop), None).await,
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

    /// Kills the sandbox, then reports the terminal transition.
    async fn end(&mut self, event: RunEvent, reason: &str, exit_code: Option<i32>) {
        self.kill_sandbox().await;
        match self.transition(event, reason, exit_code).await {
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

    async fn transition(
        &self,
        event: RunEvent,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<Run, ClientError> {
        let request = TransitionRequest {
            run_id: self.run_id.clone(),
            event: event as i32,
            reason: reason.to_owned(),
            actor: self.spawner.actor.clone(),
            exit_code,
            expected_version: 0,
        };
        let client = &self.spawner.client;
        (|| client.transition(&request))
            .retry(retry_policy())
            .when(ClientError::is_transient)
            .await
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

/// Publishes output lines as `agent.output` events, keeping up to 256
/// publishes in flight; `flush` waits for every PubAck.
struct Publisher {
    js: jetstream::Context,
    subject: String,
    run_id: String,
    seq: u64,
    in_flight: FuturesUnordered<<PublishAckFuture as std::future::IntoFuture>::IntoFuture>,
}

impl Publisher {
    fn new(
        js: jetstream::Context,
        subjects: &corral_proto::Subjects,
        run_id: &str,
        seq: u64,
    ) -> Publisher {
        Publisher {
            js,
            subject: subjects.events(run_id, "agent.output"),
            run_id: run_id.to_owned(),
            seq,
            in_flight: FuturesUnordered::new(),
        }
    }

    async fn publish(&mut self, line: OutputLine) {
        self.seq += 1;
        let event_id = uuid::Uuid::now_v7().to_string();
        let stream = match line.stream {
            OutputStream::Stdout => output::Stream::Stdout,
            OutputStream::Stderr => output::Stream::Stderr,
        };
        let event = AgentEvent {
            event_id: event_id.clone(),
            run_id: self.run_id.clone(),
            seq: self.seq,
            at_ms: corral_common::now_ms(),
            kind: "agent.output".into(),
            payload: Some(agent_event::Payload::Output(corral_proto::v1::Output {
                stream: stream as i32,
                line: line.line,
            })),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(corral_proto::headers::MSG_ID, event_id.as_str());
        match self
            .js
            .publish_with_headers(self.subject.clone(), headers, event.encode_to_vec().into())
            .await
        {
            Ok(ack) => self
                .in_flight
                .push(std::future::IntoFuture::into_future(ack)),
            Err(err) => tracing::warn!(error = %err, "output event publish failed"),
        }
        while self.in_flight.len() >= 256 {
            self.settle_one().await;
        }
    }

    async fn settle_one(&mut self) {
        if let Some(Err(err)) = self.in_flight.next().await {
            tracing::warn!(error = %err, "output event not acknowledged");
        }
    }

    async fn flush(&mut self) {
        while !self.in_flight.is_empty() {
            self.settle_one().await;
        }
    }
}
