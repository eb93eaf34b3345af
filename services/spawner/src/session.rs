//! Kept runs between turns: `continue` (take the run for its next turn),
//! and `pause`, `resume` and `end` of its sandbox.
//!
//! Nobody owns a kept run between turns. Whoever acts on its sandbox first
//! takes it through the tracker (`continue`, `pause`, `resume` are refused
//! while another instance holds the run), so a late pause can never freeze
//! the agent of a turn that started meanwhile. Pause and resume hold the run
//! only while they call the provider and then release it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use backon::{ExponentialBuilder, Retryable};
use corral_client::ClientError;
use corral_common::delivery::Delivery;
use corral_proto::v1::{
    ContinueCommand, Run, RunEvent, RunState, SessionCommand, TransitionRequest, session_command,
    tracker_error::{Code, Refusal},
};
use corral_provider::ProviderError;

use crate::Spawner;
use crate::command::{accept, within_horizon};
use crate::supervisor::Turn;

/// How long a continue waits for this spawner's supervisor of the run's
/// previous turn to return (it has recorded the turn's end by then).
const TURN_WIND_DOWN: Duration = Duration::from_secs(5);

fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(6)
}

/// Takes a kept run for its next turn: `idle|paused -> running` with this
/// spawner as owner. Returns the turn to supervise.
pub(crate) async fn handle_continue(
    spawner: &Arc<Spawner>,
    message: jetstream::Message,
) -> Option<Turn> {
    let validate = corral_proto::validate::continue_command;
    let delivery = accept::<ContinueCommand>(spawner, message, validate, |c| &c.run_id).await?;
    let run_id = delivery.value().run_id.clone();
    if !spawner.activate_within(&run_id, TURN_WIND_DOWN).await {
        // This spawner runs a turn of it right now: the run is not idle.
        let reason = format!(
            "run {run_id} is running a turn: continue applies to an idle or paused kept run"
        );
        delivery.dead_letter(&reason).await;
        return None;
    }
    let taken = take(spawner, &run_id, RunEvent::Continue, "").await;
    match taken {
        Ok((run, from)) => {
            let command = delivery.double_ack().await;
            Some(Turn { command, run, from })
        }
        Err(err) => {
            spawner.deactivate(&run_id);
            refuse(spawner, delivery, &run_id, "continue", err).await;
            None
        }
    }
}

/// Pause, resume or end a kept run between turns.
pub(crate) async fn handle_session(spawner: &Arc<Spawner>, message: jetstream::Message) {
    let validate = corral_proto::validate::session_command;
    let Some(delivery) = accept::<SessionCommand>(spawner, message, validate, |c| &c.run_id).await
    else {
        return;
    };
    let command = delivery.value();
    let run_id = command.run_id.clone();
    let action = command.action();
    let actor = actor_of(command, &spawner.actor);
    let outcome = match action {
        session_command::Action::Pause => pause(spawner, &run_id, &actor).await,
        session_command::Action::Resume => resume(spawner, &run_id, &actor).await,
        session_command::Action::End => end(spawner, &run_id, &actor).await,
        session_command::Action::Unspecified => Ok(()),
    };
    match outcome {
        Ok(()) => {
            delivery.ack().await;
        }
        // A pause that lost to a continue, a resume of a run that is not
        // paused: nothing to do, and nothing wrong with the command.
        Err(err) if matches!(err.code(), Some(Code::IllegalTransition | Code::NotFound)) => {
            tracing::info!(run_id, action = action.as_str_name(), error = %err, "session command not applied");
            delivery.ack().await;
        }
        Err(err) => refuse(spawner, delivery, &run_id, action.as_str_name(), err).await,
    }
}

/// Who asked, as the run's history shows it.
fn actor_of(command: &SessionCommand, spawner_actor: &str) -> String {
    if command.requested_by.is_empty() {
        spawner_actor.to_owned()
    } else {
        format!("{} via {spawner_actor}", command.requested_by)
    }
}

/// idle -> paused, holding the run while the provider freezes the sandbox.
async fn pause(spawner: &Arc<Spawner>, run_id: &str, actor: &str) -> Result<(), ClientError> {
    let (run, _) = take(spawner, run_id, RunEvent::Pause, actor).await?;
    let provider = spawner.provider.clone();
    let paused = (|| provider.pause(&run.sandbox_id))
        .retry(retry_policy())
        .when(|e| e.is_transient())
        .await;
    match paused {
        Ok(()) => metrics::counter!("corral_sandbox_pauses_total").increment(1),
        // Gone: nothing bills; the next continue replaces it.
        Err(ProviderError::NotFound(_)) => {}
        Err(err) => {
            // Not frozen: the record must not say paused (nor bill so).
            tracing::warn!(run_id, error = %err, "pause failed; back to idle");
            let back = held(spawner, run_id, RunEvent::Resume, "pause failed", actor);
            spawner.client.transition(&back).await?;
        }
    }
    release(spawner, run_id).await;
    Ok(())
}

/// paused -> idle, holding the run while the provider thaws the sandbox.
async fn resume(spawner: &Arc<Spawner>, run_id: &str, actor: &str) -> Result<(), ClientError> {
    let (run, _) = take(spawner, run_id, RunEvent::Resume, actor).await?;
    let provider = spawner.provider.clone();
    let resumed = (|| provider.resume(&run.sandbox_id))
        .retry(retry_policy())
        .when(|e| e.is_transient())
        .await;
    match resumed {
        Ok(()) => {}
        // Gone: the next continue probes and replaces it.
        Err(ProviderError::NotFound(_)) => {}
        Err(err) => tracing::warn!(run_id, error = %err, "resume failed"),
    }
    release(spawner, run_id).await;
    Ok(())
}

/// A stop recorded between turns: kill the sandbox, then record the stop
/// at the version the decision was made on.
async fn end(spawner: &Arc<Spawner>, run_id: &str, actor: &str) -> Result<(), ClientError> {
    let run = spawner.client.get(run_id).await?;
    let between_turns = matches!(run.state(), RunState::Idle | RunState::Paused);
    if !between_turns || run.stop_requested_at_ms == 0 {
        // Its owner (a turn started first) or nobody has anything to do.
        return Ok(());
    }
    kill(spawner, &run).await;
    let reason = if run.stop_reason.is_empty() {
        "stop requested".to_owned()
    } else {
        run.stop_reason.clone()
    };
    let request = TransitionRequest {
        run_id: run_id.to_owned(),
        event: RunEvent::Stop as i32,
        reason,
        actor: actor.to_owned(),
        expected_version: run.version,
        ..Default::default()
    };
    spawner.client.transition(&request).await.map(|_| ())
}

async fn kill(spawner: &Arc<Spawner>, run: &Run) {
    if run.sandbox_id.is_empty() {
        return;
    }
    let provider = spawner.provider.clone();
    let killed = (|| provider.kill(&run.sandbox_id))
        .retry(retry_policy())
        .when(|e| e.is_transient())
        .await;
    if let Err(err) = killed {
        // The reaper's reconciliation finds it by its labels.
        tracing::error!(run_id = %run.run_id, sandbox_id = %run.sandbox_id, error = %err, "sandbox kill failed");
    }
}

fn held(
    spawner: &Spawner,
    run_id: &str,
    event: RunEvent,
    reason: &str,
    actor: &str,
) -> TransitionRequest {
    TransitionRequest {
        run_id: run_id.to_owned(),
        event: event as i32,
        reason: reason.to_owned(),
        actor: if actor.is_empty() {
            spawner.actor.clone()
        } else {
            actor.to_owned()
        },
        owner: spawner.id.clone(),
        ..Default::default()
    }
}

/// Applies a between-turns event with this spawner as the holder.
async fn take(
    spawner: &Spawner,
    run_id: &str,
    event: RunEvent,
    actor: &str,
) -> Result<(Run, RunState), ClientError> {
    let request = held(spawner, run_id, event, "", actor);
    let client = &spawner.client;
    (|| client.transition_from(&request))
        .retry(retry_policy())
        .when(ClientError::is_transient)
        .await
}

async fn release(spawner: &Spawner, run_id: &str) {
    if let Err(err) = spawner.client.release(run_id, &spawner.id).await {
        // The hold expires by itself.
        tracing::warn!(run_id, error = %err, "release failed");
    }
}

/// A refused session command: retried while the run is held by another
/// instance or the tracker is down; otherwise dead-lettered with the
/// tracker's reason (a continue of a running or ended run, an unknown run).
async fn refuse<T>(
    spawner: &Spawner,
    delivery: Delivery<T>,
    run_id: &str,
    what: &str,
    err: ClientError,
) {
    let busy = err.refusal() == Refusal::HeldByAnother;
    if (busy || err.is_transient()) && within_horizon(spawner, &delivery) {
        let delay = if busy {
            Duration::from_millis(100)
        } else {
            delivery.backoff()
        };
        tracing::info!(run_id, what, error = %err, ?delay, "retrying later");
        delivery.nak_after(delay).await;
        return;
    }
    let mut reason = format!("{what} of run {run_id} refused: {err}");
    if err.code() == Some(Code::IllegalTransition) {
        reason.push_str(" (continue applies to an idle or paused kept run)");
    }
    delivery.dead_letter(&reason).await;
}
