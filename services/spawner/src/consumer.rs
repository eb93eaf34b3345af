//! The command loop: pulls `run` commands from the shared durable consumer,
//! one owned-run permit per command, and decides each: dead-letter what is
//! malformed or invalid (terminated, never redelivered), retry with backoff
//! what failed for a transient reason, ack once the tracker has claimed the
//! run for this spawner (from then on the run's record, not the message,
//! carries the work; a spawner that dies leaves an owner-lost run, never a
//! second agent).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use corral_proto::Subjects;
use corral_proto::v1::{RunCommand, claim_reply::Outcome};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Error, Spawner, command, session, supervisor};

/// The shared consumer's configuration. No delivery limit: the spawner, not
/// the server, decides when a command is given up (dead-lettered, never
/// dropped).
pub(crate) fn consumer_config(subjects: &Subjects, ack_wait: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(Subjects::SPAWNER_CONSUMER.into()),
        filter_subject: subjects.cmd_work(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

pub(crate) async fn consume(
    spawner: Arc<Spawner>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let subjects = spawner.subjects().clone();
    let js = spawner.client.jetstream().clone();
    let consumer = corral_common::streams::pull_consumer_patiently(
        &js,
        &subjects.cmd_stream(),
        consumer_config(
            &subjects,
            Duration::from_millis(spawner.config.command_ack_wait_ms.max(100)),
        ),
    )
    .await
    .map_err(Error::Consumer)?;
    let batch = spawner.config.max_runs.clamp(1, 64);
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await
        .map_err(|e| Error::Consumer(e.to_string()))?;
    loop {
        // Take a command only when a run can be owned.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            permit = spawner.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Ok(()),
            },
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = messages.next() => match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "command consumer error");
                    continue;
                }
                None => return Err(Error::Consumer("command consumer closed".into())),
            },
        };
        let span = tracing::info_span!("command", subject = %message.subject, run_id = tracing::field::Empty);
        corral_common::telemetry::adopt(&span, message.headers.as_ref());
        // Claims run concurrently; the permit moves into the run's supervisor.
        let spawner = spawner.clone();
        let runs = spawner.runs.clone();
        runs.spawn(
            async move {
                let work = dispatch(&spawner, message).await;
                let run_id = match &work {
                    Some(Work::Run(start)) => start.command.run_id.clone(),
                    Some(Work::Turn(turn)) => turn.run.run_id.clone(),
                    None => return,
                };
                let runs = spawner.runs.clone();
                runs.spawn(
                    async move {
                        match work {
                            Some(Work::Run(start)) => supervisor::supervise(&spawner, *start).await,
                            Some(Work::Turn(turn)) => {
                                supervisor::supervise_turn(&spawner, *turn).await
                            }
                            None => {}
                        }
                        spawner.deactivate(&run_id);
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
            .instrument(span),
        );
    }
}

/// What a command gave this spawner to supervise.
/// (Boxed: both carry a run's whole spec; the future that holds one stays small.)
enum Work {
    Run(Box<supervisor::Start>),
    Turn(Box<supervisor::Turn>),
}

/// Decides one command by its subject.
async fn dispatch(spawner: &Arc<Spawner>, message: jetstream::Message) -> Option<Work> {
    let subjects = spawner.subjects();
    let subject = message.subject.as_str();
    if subject == subjects.cmd_run() {
        handle(spawner, message)
            .await
            .map(|start| Work::Run(Box::new(start)))
    } else if subject == subjects.cmd_continue() {
        session::handle_continue(spawner, message)
            .await
            .map(|turn| Work::Turn(Box::new(turn)))
    } else if subject == subjects.cmd_session() {
        session::handle_session(spawner, message).await;
        None
    } else {
        let reason = format!("{subject} is not a command subject this spawner knows");
        command::dead_letters(spawner).send(message, &reason).await;
        None
    }
}

/// Decides a run command; returns the run to supervise when this spawner
/// claimed it.
async fn handle(spawner: &Arc<Spawner>, message: jetstream::Message) -> Option<supervisor::Start> {
    let validate = corral_proto::validate::run_command;
    let delivery = command::accept::<RunCommand>(spawner, message, validate, |c| &c.run_id).await?;
    let provider = delivery
        .value()
        .spec
        .as_ref()
        .map(|s| s.provider.as_str())
        .unwrap_or("");
    if !provider.is_empty() && provider != spawner.provider.name() {
        let reason = format!("spec.provider {provider:?} is not configured on this spawner");
        delivery.dead_letter(&reason).await;
        return None;
    }
    let run_id = delivery.value().run_id.clone();
    if !spawner.activate(&run_id) {
        // A redelivery while this spawner already runs it.
        delivery.ack().await;
        return None;
    }
    let forget = || spawner.deactivate(&run_id);
    let deliveries = delivery.deliveries();
    match spawner.client.claim(delivery.value(), &spawner.id).await {
        Ok((Outcome::Claimed, run)) => {
            // The claim is durable: from here the record carries the run.
            let command = delivery.double_ack().await;
            Some(supervisor::Start { command, run })
        }
        Ok((outcome, run)) => {
            tracing::info!(outcome = ?outcome, state = run.state().name(), owner = %run.owner, "run not claimed");
            forget();
            delivery.ack().await;
            None
        }
        Err(err) if err.is_transient() && command::within_horizon(spawner, &delivery) => {
            forget();
            let delay = delivery.nak_with_backoff().await;
            tracing::warn!(error = %err, deliveries, ?delay, "claim failed, retrying");
            None
        }
        Err(err) => {
            forget();
            let reason = if err.is_transient() {
                format!(
                    "claim failed for {} s (claim_horizon_ms), {deliveries} deliveries: {err}",
                    spawner.config.claim_horizon_ms / 1000
                )
            } else {
                format!("claim refused: {err}")
            };
            delivery.dead_letter(&reason).await;
            None
        }
    }
}
