//! An execution's output on its way to the run's event stream: at least
//! once, in order of sequence, bounded while NATS is slow.

use std::time::Duration;

use async_nats::jetstream;
use corral_proto::v1::{AgentEvent, agent_event, output};
use corral_provider::{OutputLine, OutputStream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prost::Message;
use tracing::Instrument;

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
pub(super) struct Publisher {
    run_id: String,
    turn: u32,
    seq: u64,
    /// Lines dropped since the last announcement.
    dropped: u64,
    lines: Option<tokio::sync::mpsc::Sender<AgentEvent>>,
    relay: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub(super) fn new(
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
    pub(super) fn publish(&mut self, line: OutputLine) {
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
    pub(super) async fn flush(mut self) -> u64 {
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
