//! Watching one execution: its output published, its exit, a stop on the
//! run's stop subject, the run's deadline, its inactivity window and the
//! spawner's shutdown; whatever ends it first ends the process group.

use std::time::Duration;

use corral_proto::v1::{AgentEvent, StopCommand, agent_event};
use futures::StreamExt;
use prost::Message;
use tokio::time::Instant;

use super::output::Publisher;
use super::{Ending, Supervisor, describe};

impl Supervisor {
    /// Runs one execution to its end: publishes output, resets the
    /// inactivity timer on output, notes the session id the agent reports,
    /// and ends the process group on a stop (when `stoppable`), a timeout or
    /// shutdown. When the agent exits, what it left running dies with it
    /// unless `keep` (a kept sandbox keeps its background processes).
    pub(super) async fn watch(
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

/// The monotonic instant of a wall-clock time in Unix ms (far future if 0).
fn instant_of(at_ms: i64) -> Instant {
    if at_ms <= 0 {
        return Instant::now() + Duration::from_secs(365 * 24 * 3600);
    }
    let remaining = at_ms - corral_common::now_ms();
    Instant::now() + Duration::from_millis(remaining.max(0) as u64)
}
