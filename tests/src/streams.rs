//! Stream inspection: what this test's JetStream streams hold, read
//! message by message for assertions.

use corral_proto::v1::LifecycleEvent;
use prost::Message;

use crate::TestEnv;

impl TestEnv {
    /// The run's output lines (`agent.output` events), from the events
    /// stream, in order.
    pub async fn output(&self, run_id: &str) -> Vec<String> {
        use corral_proto::v1::{AgentEvent, agent_event};
        use prost::Message;
        let subject = self.subjects.events(run_id, "agent.output");
        self.stream_messages(&self.subjects.events_stream(), &subject)
            .await
            .into_iter()
            .filter_map(|m| match AgentEvent::decode(m.payload).ok()?.payload? {
                agent_event::Payload::Output(line) => Some(line.line),
                _ => None,
            })
            .collect()
    }

    /// The run's lifecycle announcements as the stream holds them, in
    /// stream order, with each message's `Nats-Msg-Id`.
    pub async fn lifecycle(&self, run_id: &str) -> Vec<(String, LifecycleEvent)> {
        let messages = self
            .stream_messages(
                &self.subjects.lifecycle_stream(),
                &self.subjects.lifecycle(run_id),
            )
            .await;
        messages
            .iter()
            .map(|m| {
                let msg_id = m
                    .headers
                    .get("Nats-Msg-Id")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let event =
                    LifecycleEvent::decode(m.payload.clone()).expect("a lifecycle message decodes");
                (msg_id, event)
            })
            .collect()
    }

    /// Every message on a stream subject, for assertions.
    pub async fn stream_messages(
        &self,
        stream: &str,
        subject: &str,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        let client = self.client().await;
        let js = client.jetstream();
        let mut stream = js.get_stream(stream).await.expect("stream should exist");
        let info = stream.info().await.expect("stream info").clone();
        let mut found = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            if let Ok(message) = stream.get_raw_message(seq).await
                && (subject.is_empty() || subject_matches(subject, &message.subject))
            {
                found.push(message);
            }
        }
        found
    }
}

/// NATS subject matching with `*` and `>`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match token {
            ">" => return subject_tokens.next().is_some(),
            "*" => {
                if subject_tokens.next().is_none() {
                    return false;
                }
            }
            literal => {
                if subject_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    subject_tokens.next().is_none()
}
