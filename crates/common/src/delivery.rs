//! One delivery of a JetStream message, from decoding to its verdict.
//!
//! A [`Delivery`] holds a message pulled from a consumer with explicit ack
//! and the protobuf value decoded from it. Making one decodes and validates
//! the payload; what does not decode or is not valid is dead-lettered with
//! the reason and terminated, so a poison message never stalls the queue.
//! Every delivery then ends in one verdict: ack, nak (after the backoff or
//! a given delay) or dead letter. One dropped without a verdict (a handler
//! that returned early, panicked or was cancelled) is nakked with the
//! backoff, never left to wait out the consumer's `ack_wait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use corral_proto::Subjects;

/// Redelivery delay after `deliveries` attempts: 250 ms doubling, at most 30 s.
pub fn backoff(deliveries: i64) -> Duration {
    let exponent = deliveries.clamp(1, 8) as u32 - 1;
    Duration::from_millis(250 * 2u64.pow(exponent)).min(Duration::from_secs(30))
}

/// Where one consumer's poison messages go: `<prefix>.dlq.<kind>`, with the
/// reason in the `Corral-Error` header (see [`crate::nats::dead_letter`]).
/// Cheap to clone.
#[derive(Clone)]
pub struct DeadLetters {
    inner: Arc<Inner>,
}

struct Inner {
    js: jetstream::Context,
    subjects: Subjects,
    kind: String,
}

impl DeadLetters {
    /// Dead letters of `kind` (`cmd`, `events`, ...), the last token of
    /// their subject, which `corral dlq` shows and replays by.
    pub fn new(js: jetstream::Context, subjects: &Subjects, kind: &str) -> DeadLetters {
        DeadLetters {
            inner: Arc::new(Inner {
                js,
                subjects: subjects.clone(),
                kind: kind.to_owned(),
            }),
        }
    }

    /// Copies `message` to the dead letters with `reason` and terminates it
    /// on its stream. When the copy cannot be published the message is
    /// nakked with the [`backoff`] instead, so it is tried again and not
    /// lost. Returns whether it was dead-lettered.
    pub async fn send(&self, message: jetstream::Message, reason: &str) -> bool {
        let kind = self.inner.kind.as_str();
        tracing::warn!(kind, subject = %message.subject, reason, "dead-lettering message");
        let sent =
            crate::nats::dead_letter(&self.inner.js, &self.inner.subjects, kind, &message, reason)
                .await;
        match sent {
            Ok(()) => true,
            Err(err) => {
                let delay = backoff(deliveries(&message));
                tracing::error!(kind, error = %err, retry_in = ?delay, "dead-letter publish failed; the message will be redelivered");
                if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(kind, error = %err, "nak failed; redelivered after ack_wait");
                }
                false
            }
        }
    }
}

/// A message and the value decoded from it, until its verdict.
///
/// Every way out answers the message exactly once: [`ack`](Self::ack),
/// [`double_ack`](Self::double_ack), [`nak_with_backoff`](Self::nak_with_backoff),
/// [`nak_after`](Self::nak_after) and [`dead_letter`](Self::dead_letter)
/// consume the delivery; dropping it naks with the backoff.
pub struct Delivery<T> {
    /// `Some` until the verdict.
    message: Option<jetstream::Message>,
    value: T,
    dead_letters: DeadLetters,
}

impl<T: prost::Message + Default> Delivery<T> {
    /// Decodes the message's payload as `T` and checks it with `validate`.
    /// A payload that does not decode, or a value `validate` refuses, is
    /// dead-lettered with the reason (`payload did not decode as <T>: ...`,
    /// or `validate`'s own words) and `None` returned: the message has had
    /// its verdict.
    pub async fn decode(
        message: jetstream::Message,
        dead_letters: &DeadLetters,
        validate: impl FnOnce(&T) -> Result<(), String>,
    ) -> Option<Delivery<T>> {
        let value = match T::decode(message.payload.clone()) {
            Ok(value) => value,
            Err(err) => {
                let reason = format!("payload did not decode as {}: {err}", type_name::<T>());
                dead_letters.send(message, &reason).await;
                return None;
            }
        };
        if let Err(reason) = validate(&value) {
            dead_letters.send(message, &reason).await;
            return None;
        }
        Some(Delivery {
            message: Some(message),
            value,
            dead_letters: dead_letters.clone(),
        })
    }
}

impl<T> Delivery<T> {
    pub fn value(&self) -> &T {
        &self.value
    }

    pub fn value_mut(&mut self) -> &mut T {
        &mut self.value
    }

    /// The message as delivered: subject, headers, payload.
    pub fn message(&self) -> &jetstream::Message {
        self.message
            .as_ref()
            .expect("a delivery should hold its message until its verdict")
    }

    pub fn subject(&self) -> &str {
        self.message().subject.as_str()
    }

    pub fn headers(&self) -> Option<&HeaderMap> {
        self.message().headers.as_ref()
    }

    /// How many times the message has been delivered, this time included.
    pub fn deliveries(&self) -> i64 {
        deliveries(self.message())
    }

    /// The message's sequence number in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.message()
            .info()
            .map(|info| info.stream_sequence)
            .unwrap_or(0)
    }

    /// Whether the message was first published less than `horizon` ago (or
    /// its time is unknown): a transient failure is worth a retry within it.
    pub fn published_within(&self, horizon: Duration) -> bool {
        let Ok(info) = self.message().info() else {
            return true;
        };
        let age = time::OffsetDateTime::now_utc() - info.published;
        age.whole_milliseconds() < horizon.as_millis() as i128
    }

    /// The delay [`nak_with_backoff`](Self::nak_with_backoff) would ask for.
    pub fn backoff(&self) -> Duration {
        backoff(self.deliveries())
    }

    /// Naks for redelivery after the [`backoff`] for this delivery count;
    /// returns that delay.
    pub async fn nak_with_backoff(self) -> Duration {
        let delay = self.backoff();
        self.nak_after(delay).await;
        delay
    }

    /// Naks for redelivery after `delay`.
    pub async fn nak_after(mut self, delay: Duration) {
        let message = self.answer();
        if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(subject = %message.subject, error = %err, "nak failed; redelivered after ack_wait");
        }
    }

    /// Dead-letters the message with `reason` and terminates it (see
    /// [`DeadLetters::send`]); returns whether it was dead-lettered.
    pub async fn dead_letter(mut self, reason: &str) -> bool {
        let message = self.answer();
        self.dead_letters.send(message, reason).await
    }

    /// The message, taken for its verdict: from here a drop does nothing.
    fn answer(&mut self) -> jetstream::Message {
        self.message
            .take()
            .expect("a delivery should hold its message until its verdict")
    }
}

impl<T: Default> Delivery<T> {
    /// Acks, and hands back the value for the work that follows the ack.
    /// A failed ack is logged: the message will be redelivered.
    pub async fn ack(mut self) -> T {
        let message = self.answer();
        if let Err(err) = message.ack().await {
            tracing::warn!(subject = %message.subject, error = %err, "ack failed; the message will be redelivered");
        }
        std::mem::take(&mut self.value)
    }

    /// Acks and waits for the server to confirm it, for work that must not
    /// start while the message could still be redelivered to someone else.
    /// Hands back the value.
    pub async fn double_ack(mut self) -> T {
        let message = self.answer();
        if let Err(err) = message.double_ack().await {
            tracing::warn!(subject = %message.subject, error = %err, "ack not confirmed; the message may be redelivered");
        }
        std::mem::take(&mut self.value)
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        let Some(message) = self.message.take() else {
            return;
        };
        let delay = backoff(deliveries(&message));
        tracing::debug!(subject = %message.subject, retry_in = ?delay, "delivery dropped without a verdict; nakking");
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                        tracing::warn!(subject = %message.subject, error = %err, "nak failed; redelivered after ack_wait");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(subject = %message.subject, "delivery dropped outside a runtime; redelivered after ack_wait");
            }
        }
    }
}

fn deliveries(message: &jetstream::Message) -> i64 {
    message.info().map(|info| info.delivered).unwrap_or(1)
}

/// `corral.v1.RunCommand` -> `RunCommand`.
fn type_name<T>() -> &'static str {
    std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("the expected message")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_nats::jetstream::consumer::{self, PullConsumer};
    use corral_proto::headers;
    use corral_proto::v1::StopCommand;
    use futures::StreamExt;

    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(4), Duration::from_secs(2));
        assert_eq!(backoff(100), Duration::from_secs(30));
        // A count the server never sends still gets the first delay.
        assert_eq!(backoff(0), Duration::from_millis(250));
    }

    #[test]
    fn a_type_is_named_without_its_path() {
        assert_eq!(type_name::<StopCommand>(), "StopCommand");
    }

    /// Streams of a prefix of their own on the NATS server at `NATS_URL`
    /// (default 127.0.0.1:4222), and a pull consumer on its commands.
    struct Bench {
        js: jetstream::Context,
        subjects: Subjects,
        consumer: PullConsumer,
    }

    impl Bench {
        async fn new() -> Bench {
            static COUNT: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let prefix = format!(
                "dt{:x}{}x{}",
                nanos % (1 << 40),
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            );
            let subjects = Subjects::new(&prefix).expect("the test prefix should be valid");
            let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
            let client = crate::nats::connect(&url, "delivery test", Duration::from_secs(5))
                .await
                .expect("a NATS server with JetStream should run at NATS_URL");
            let js = jetstream::new(client);
            crate::nats::ensure_streams(&js, &subjects)
                .await
                .expect("streams");
            let consumer = js
                .get_stream(subjects.cmd_stream())
                .await
                .expect("the command stream")
                .create_consumer(consumer::pull::Config {
                    durable_name: Some("delivery-test".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .expect("consumer");
            Bench {
                js,
                subjects,
                consumer,
            }
        }

        fn dead_letters(&self) -> DeadLetters {
            DeadLetters::new(self.js.clone(), &self.subjects, "cmd")
        }

        async fn publish(&self, payload: Vec<u8>) {
            self.js
                .publish(self.subjects.cmd_stop("r1"), payload.into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }

        /// The next delivery within `wait`, if any.
        async fn next(&self, wait: Duration) -> Option<jetstream::Message> {
            let mut batch = self
                .consumer
                .fetch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await
                .expect("fetch");
            batch
                .next()
                .await
                .map(|message| message.expect("a message"))
        }

        async fn dead_letters_held(&self) -> Vec<async_nats::jetstream::message::StreamMessage> {
            let stream = self
                .js
                .get_stream(self.subjects.dlq_stream())
                .await
                .expect("the dead-letter stream");
            let last = stream.get_info().await.expect("info").state.last_sequence;
            let mut held = Vec::new();
            for seq in 1..=last {
                held.push(stream.get_raw_message(seq).await.expect("a dead letter"));
            }
            held
        }

        async fn ack_pending(&self) -> usize {
            let mut consumer = self.consumer.clone();
            consumer
                .info()
                .await
                .expect("consumer info")
                .num_ack_pending
        }

        async fn remove(self) {
            for stream in [
                self.subjects.cmd_stream(),
                self.subjects.lifecycle_stream(),
                self.subjects.events_stream(),
                self.subjects.dlq_stream(),
            ] {
                let _ = self.js.delete_stream(stream).await;
            }
        }
    }

    fn stop(run_id: &str) -> Vec<u8> {
        prost::Message::encode_to_vec(&StopCommand {
            run_id: run_id.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_payload_that_does_not_decode_is_dead_lettered_saying_so_and_never_redelivered() {
        let bench = Bench::new().await;
        bench.publish(b"\xff\xff not protobuf".to_vec()).await;
        let message = bench.next(Duration::from_secs(5)).await.expect("delivered");
        let decoded =
            Delivery::<StopCommand>::decode(message, &bench.dead_letters(), |_| Ok(())).await;
        assert!(decoded.is_none(), "nothing to handle");

        let held = bench.dead_letters_held().await;
        assert_eq!(held.len(), 1, "one dead letter");
        let letter = &held[0];
        assert_eq!(letter.subject.as_str(), bench.subjects.dlq("cmd"));
        let header = |name: &str| {
            letter
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        let error = header(headers::DLQ_ERROR);
        assert!(
            error.starts_with("payload did not decode as StopCommand: "),
            "{error}"
        );
        assert_eq!(
            header(headers::DLQ_ORIGINAL_SUBJECT),
            bench.subjects.cmd_stop("r1")
        );
        assert_eq!(header(headers::DLQ_DELIVERIES), "1");
        assert_eq!(&letter.payload[..], b"\xff\xff not protobuf");
        assert_eq!(bench.ack_pending().await, 0, "the original was answered");
        assert!(
            bench.next(Duration::from_millis(700)).await.is_none(),
            "the original is not redelivered"
        );
        bench.remove().await;
    }

    #[tokio::test]
    async fn a_value_validation_refuses_is_dead_lettered_with_its_reason() {
        let bench = Bench::new().await;
        bench.publish(stop("r2")).await;
        let message = bench.next(Duration::from_secs(5)).await.expect("delivered");
        let decoded = Delivery::<StopCommand>::decode(message, &bench.dead_letters(), |stop| {
            Err(format!("run_id {:?} is not the subject's", stop.run_id))
        })
        .await;
        assert!(decoded.is_none());
        let held = bench.dead_letters_held().await;
        assert_eq!(held.len(), 1);
        let error = held[0].headers.get(headers::DLQ_ERROR).expect("a reason");
        assert_eq!(error.as_str(), "run_id \"r2\" is not the subject's");
        assert!(bench.next(Duration::from_millis(700)).await.is_none());
        bench.remove().await;
    }

    #[tokio::test]
    async fn a_delivery_dropped_without_a_verdict_is_redelivered() {
        let bench = Bench::new().await;
        bench.publish(stop("r1")).await;
        let message = bench.next(Duration::from_secs(5)).await.expect("delivered");
        let delivery = Delivery::<StopCommand>::decode(message, &bench.dead_letters(), |_| Ok(()))
            .await
            .expect("a valid stop");
        assert_eq!(delivery.value().run_id, "r1");
        assert_eq!(delivery.deliveries(), 1);
        let sequence = delivery.stream_sequence();
        assert!(delivery.published_within(Duration::from_secs(60)));
        assert!(!delivery.published_within(Duration::ZERO));
        drop(delivery);

        // Well before ack_wait (30 s): the drop nakked it.
        let again = bench
            .next(Duration::from_secs(5))
            .await
            .expect("redelivered after the drop");
        let delivery = Delivery::<StopCommand>::decode(again, &bench.dead_letters(), |_| Ok(()))
            .await
            .expect("a valid stop");
        assert_eq!(delivery.stream_sequence(), sequence);
        assert_eq!(delivery.deliveries(), 2);
        let stop = delivery.ack().await;
        assert_eq!(stop.run_id, "r1", "ack hands back the value");
        assert!(
            bench.next(Duration::from_millis(700)).await.is_none(),
            "an acked message is not redelivered"
        );
        assert!(bench.dead_letters_held().await.is_empty());
        bench.remove().await;
    }

    #[tokio::test]
    async fn a_nak_with_backoff_is_redelivered_after_the_backoff_and_a_dead_letter_is_not() {
        let bench = Bench::new().await;
        bench.publish(stop("r1")).await;
        let message = bench.next(Duration::from_secs(5)).await.expect("delivered");
        let delivery = Delivery::<StopCommand>::decode(message, &bench.dead_letters(), |_| Ok(()))
            .await
            .expect("a valid stop");
        let nakked = tokio::time::Instant::now();
        assert_eq!(
            delivery.nak_with_backoff().await,
            Duration::from_millis(250)
        );
        let again = bench
            .next(Duration::from_secs(5))
            .await
            .expect("redelivered");
        assert!(
            nakked.elapsed() >= Duration::from_millis(200),
            "not at once"
        );
        let delivery = Delivery::<StopCommand>::decode(again, &bench.dead_letters(), |_| Ok(()))
            .await
            .expect("a valid stop");
        assert_eq!(delivery.backoff(), Duration::from_millis(500));
        assert!(delivery.dead_letter("given up: a test says so").await);
        let held = bench.dead_letters_held().await;
        assert_eq!(held.len(), 1);
        let deliveries = held[0].headers.get(headers::DLQ_DELIVERIES).expect("count");
        assert_eq!(deliveries.as_str(), "2");
        assert!(bench.next(Duration::from_millis(700)).await.is_none());
        bench.remove().await;
    }
}
