//! corral's JetStream streams, as configured: replicas, age, size and
//! discard policy per stream (`streams: {commands, lifecycle, events,
//! dead_letters}` in every service's configuration, e.g.
//! `CORRAL_STREAMS__EVENTS__REPLICAS=3`).
//!
//! Every service creates a missing stream with its settings; the tracker
//! also brings an existing stream's editable settings to the configured
//! ones at start, and logs what it cannot change in place (retention,
//! storage: those need a new stream).

use std::time::Duration;

use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamErrorKind,
};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, consumer, stream};
use backon::{ExponentialBuilder, Retryable};
use corral_proto::Subjects;
use serde::{Deserialize, Serialize};

use crate::nats::NatsError;

const DAY: u64 = 24 * 3600;
/// De-duplication window (`Nats-Msg-Id`) of every stream: the server's own
/// default, said so that a comparison with what it reports holds.
const DEDUP: Duration = Duration::from_secs(120);

/// The settings of one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Copies kept in a cluster: 1 on a single server, 3 on a 3-node cluster.
    pub replicas: usize,
    /// Messages older than this are removed, seconds (0: never).
    pub max_age_secs: u64,
    /// Size the stream may reach, bytes (-1: no limit).
    pub max_bytes: i64,
    /// When full: `old` drops the oldest messages, `new` refuses new ones.
    pub discard: String,
}

impl StreamSettings {
    fn days(days: u64) -> StreamSettings {
        StreamSettings {
            replicas: 1,
            max_age_secs: days * DAY,
            max_bytes: -1,
            discard: "old".into(),
        }
    }

    fn discard_policy(&self, name: &str) -> Result<stream::DiscardPolicy, NatsError> {
        match self.discard.as_str() {
            "old" => Ok(stream::DiscardPolicy::Old),
            "new" => Ok(stream::DiscardPolicy::New),
            other => Err(NatsError::Stream {
                stream: name.to_owned(),
                message: format!("streams: discard {other:?} is not `old` or `new`"),
            }),
        }
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings::days(7)
    }
}

/// The settings of every stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Streams {
    /// `<P>_CMD`: run, continue, session and stop commands (work queue).
    pub commands: StreamSettings,
    /// `<P>_LIFECYCLE`: run state transitions.
    pub lifecycle: StreamSettings,
    /// `<P>_EVENTS`: agent events.
    pub events: StreamSettings,
    /// `<P>_DLQ`: dead letters (kept 30 days by default).
    pub dead_letters: StreamSettings,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            commands: StreamSettings::days(7),
            lifecycle: StreamSettings::days(7),
            events: StreamSettings::days(7),
            dead_letters: StreamSettings::days(30),
        }
    }
}

impl Streams {
    /// The defaults with `replicas` copies of every stream: 3 on a 3-node
    /// cluster (`CORRAL_STREAMS__<STREAM>__REPLICAS=3` says the same per
    /// stream).
    pub fn replicated(replicas: usize) -> Streams {
        let mut streams = Streams::default();
        for settings in [
            &mut streams.commands,
            &mut streams.lifecycle,
            &mut streams.events,
            &mut streams.dead_letters,
        ] {
            settings.replicas = replicas;
        }
        streams
    }

    /// The most copies any stream keeps: what the reaper's lease bucket
    /// keeps, so that the lease survives what the streams survive.
    pub fn most_replicas(&self) -> usize {
        [
            &self.commands,
            &self.lifecycle,
            &self.events,
            &self.dead_letters,
        ]
        .iter()
        .map(|s| s.replicas)
        .max()
        .unwrap_or(1)
        .max(1)
    }
}

/// The stream configurations, from the subject prefix and the settings.
pub fn configs(subjects: &Subjects, streams: &Streams) -> Result<Vec<stream::Config>, NatsError> {
    let with = |mut config: stream::Config, settings: &StreamSettings| {
        config.num_replicas = settings.replicas.max(1);
        config.max_age = Duration::from_secs(settings.max_age_secs);
        config.max_bytes = settings.max_bytes;
        config.discard = settings.discard_policy(&config.name)?;
        Ok::<_, NatsError>(config)
    };
    Ok(vec![
        with(
            stream::Config {
                name: subjects.cmd_stream(),
                description: Some("corral commands: run and continue (work queue), stop".into()),
                subjects: vec![subjects.cmd_all()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: DEDUP,
                ..Default::default()
            },
            &streams.commands,
        )?,
        with(
            stream::Config {
                name: subjects.lifecycle_stream(),
                description: Some("corral run state transitions".into()),
                subjects: vec![subjects.lifecycle_all()],
                retention: stream::RetentionPolicy::Limits,
                duplicate_window: DEDUP,
                ..Default::default()
            },
            &streams.lifecycle,
        )?,
        with(
            stream::Config {
                name: subjects.events_stream(),
                description: Some("corral agent events".into()),
                subjects: vec![subjects.events_all()],
                retention: stream::RetentionPolicy::Limits,
                duplicate_window: DEDUP,
                ..Default::default()
            },
            &streams.events,
        )?,
        with(
            stream::Config {
                name: subjects.dlq_stream(),
                description: Some(
                    "corral dead letters: messages that could not be decoded or applied".into(),
                ),
                subjects: vec![subjects.dlq_all()],
                retention: stream::RetentionPolicy::Limits,
                duplicate_window: DEDUP,
                ..Default::default()
            },
            &streams.dead_letters,
        )?,
    ])
}

/// Whether a failed stream creation may succeed later: no answer in time,
/// JetStream not (yet) there, or a cluster without a leader for a moment.
/// Gets the stream `config` names, creating it if missing. A cluster
/// electing leaders, or loaded, answers late or "temporarily unavailable"
/// for a while: that is waited out (about half a minute) rather than
/// returned, so a service starting during it does not exit.
pub async fn get_or_create_patiently(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<jetstream::stream::Stream, CreateStreamError> {
    let name = config.name.clone();
    (|| js.get_or_create_stream(config.clone()))
        .retry(patience())
        .when(transient)
        .notify(|err, after| {
            tracing::warn!(stream = %name, error = %err, retry_in = ?after, "stream not provisioned yet; trying again");
        })
        .await
}

/// Gets the durable pull consumer `config` names on `stream`, creating it
/// if missing. Like [`get_or_create_patiently`], it waits out (about half
/// a minute) a cluster electing leaders, where the consumer's info or
/// creation times out or is "temporarily unavailable": a service that
/// creates its consumer once it has started must not exit for that (a
/// tracker, ingest or spawner started while a node of the cluster went
/// down did, with "nats: timed out").
pub async fn pull_consumer_patiently(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, String> {
    let name = config.durable_name.clone().unwrap_or_default();
    let attempt = || async {
        let found = js.get_stream(stream).await.map_err(|err| {
            let transient = match err.kind() {
                GetStreamErrorKind::Request => true,
                GetStreamErrorKind::JetStream(inner) => unavailable(&inner),
                _ => false,
            };
            (transient, format!("stream {stream}: {err}"))
        })?;
        found
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|err| {
                let transient = match err.kind() {
                    ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => true,
                    ConsumerErrorKind::JetStream(inner) => unavailable(&inner),
                    _ => false,
                };
                (transient, format!("consumer {name} on {stream}: {err}"))
            })
    };
    attempt
        .retry(patience())
        .when(|(transient, _)| *transient)
        .notify(|(_, err), after| {
            tracing::warn!(error = %err, retry_in = ?after, "consumer not ready yet; trying again");
        })
        .await
        .map_err(|(_, err)| err)
}

/// How long a service waits out a cluster electing leaders while it
/// provisions its streams and consumers: about half a minute in all.
fn patience() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(3))
        .with_max_times(12)
        .with_jitter()
}

/// A JetStream answer that says to try again: 503, or a cluster without a
/// leader for a moment.
fn unavailable(err: &async_nats::jetstream::Error) -> bool {
    err.code() == 503 || err.to_string().contains("temporarily unavailable")
}

fn transient(err: &CreateStreamError) -> bool {
    match err.kind() {
        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
        CreateStreamErrorKind::JetStream(inner) => unavailable(&inner),
        _ => false,
    }
}

/// What differs between an existing stream and the wanted one: settings
/// an update changes in place, and settings it cannot.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Differences {
    pub editable: Vec<String>,
    pub fixed: Vec<String>,
}

pub fn differences(current: &stream::Config, wanted: &stream::Config) -> Differences {
    let mut found = Differences::default();
    let mut note = |fixed: bool, what: &str, from: String, to: String| {
        if from != to {
            let line = format!("{what} {from} -> {to}");
            if fixed {
                found.fixed.push(line);
            } else {
                found.editable.push(line);
            }
        }
    };
    note(
        false,
        "replicas",
        current.num_replicas.to_string(),
        wanted.num_replicas.to_string(),
    );
    note(
        false,
        "max_age",
        format!("{:?}", current.max_age),
        format!("{:?}", wanted.max_age),
    );
    note(
        false,
        "max_bytes",
        current.max_bytes.to_string(),
        wanted.max_bytes.to_string(),
    );
    note(
        false,
        "discard",
        format!("{:?}", current.discard),
        format!("{:?}", wanted.discard),
    );
    note(
        false,
        "duplicate_window",
        format!("{:?}", current.duplicate_window),
        format!("{:?}", wanted.duplicate_window),
    );
    note(
        false,
        "subjects",
        format!("{:?}", current.subjects),
        format!("{:?}", wanted.subjects),
    );
    note(
        true,
        "retention",
        format!("{:?}", current.retention),
        format!("{:?}", wanted.retention),
    );
    note(
        true,
        "storage",
        format!("{:?}", current.storage),
        format!("{:?}", wanted.storage),
    );
    found
}

/// Whether [`ensure`] changes existing streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Leave them as they are (every service but the tracker).
    Keep,
    /// Bring their editable settings to the configured ones (the tracker).
    Update,
}

/// Creates the missing streams with `streams`' settings; with
/// [`Existing::Update`], updates the others whose editable settings differ
/// and logs what it changed and what it cannot change in place.
pub async fn ensure(
    js: &jetstream::Context,
    subjects: &Subjects,
    streams: &Streams,
    existing: Existing,
) -> Result<(), NatsError> {
    for wanted in configs(subjects, streams)? {
        let name = wanted.name.clone();
        let fail = |err: String| NatsError::Stream {
            stream: name.clone(),
            message: err,
        };
        let mut stream = get_or_create_patiently(js, wanted.clone())
            .await
            .map_err(|err| fail(err.to_string()))?;
        if existing == Existing::Keep {
            continue;
        }
        let current = stream
            .info()
            .await
            .map_err(|err| fail(err.to_string()))?
            .config
            .clone();
        let found = differences(&current, &wanted);
        if !found.fixed.is_empty() {
            tracing::warn!(stream = %name, differences = %found.fixed.join(", "), "stream settings that cannot change in place differ from the configuration: make a new stream to change them");
        }
        if found.editable.is_empty() {
            continue;
        }
        let mut update = wanted.clone();
        // What cannot change stays as it is, so the update is accepted.
        update.retention = current.retention;
        update.storage = current.storage;
        let updated = js
            .update_stream(update)
            .await
            .map_err(|err| fail(format!("update ({}): {err}", found.editable.join(", "))))?;
        let kept = differences(&updated.config, &wanted).editable;
        if kept.is_empty() {
            tracing::info!(stream = %name, changed = %found.editable.join(", "), "stream settings brought to the configuration");
        } else {
            // A single server keeps one replica whatever it is asked.
            tracing::warn!(stream = %name, kept = %kept.join(", "), "the server did not take every configured setting (replicas above 1 need a cluster)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_one_replica_and_the_documented_ages() {
        let made = configs(&Subjects::default(), &Streams::default()).expect("configs");
        assert!(made.iter().all(|c| c.num_replicas == 1));
        assert_eq!(made[0].max_age, Duration::from_secs(7 * DAY));
        assert_eq!(made[3].max_age, Duration::from_secs(30 * DAY));
        let bad = Streams {
            events: StreamSettings {
                discard: "oldest".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = configs(&Subjects::default(), &bad).expect_err("bad discard");
        assert!(err.to_string().contains("discard \"oldest\""), "{err}");
    }

    #[test]
    fn differences_separate_what_an_update_can_change() {
        let subjects = Subjects::default();
        let current = configs(&subjects, &Streams::default()).expect("configs");
        let mut wanted = current[2].clone();
        wanted.num_replicas = 3;
        wanted.max_bytes = 1 << 30;
        wanted.retention = stream::RetentionPolicy::Interest;
        let found = differences(&current[2], &wanted);
        assert_eq!(
            found.editable,
            ["replicas 1 -> 3", "max_bytes -1 -> 1073741824"]
        );
        assert_eq!(found.fixed, ["retention Limits -> Interest"]);
    }
}
