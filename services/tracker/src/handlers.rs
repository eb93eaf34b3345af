//! One `handle_<op>` per tracker request, plus the stop commands clients
//! published on the command stream. Every applied transition wakes the
//! lifecycle relay ([`crate::relay`]), which announces it on
//! `<prefix>.lifecycle.<run_id>` from its row in `run_transitions`.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use corral_common::nats::publish_durable;
use corral_proto::v1::{
    ActivityReply, ActivityRequest, ClaimReply, ClaimRequest, CostReply, CostRequest,
    GetRunRequest, HeartbeatReply, HeartbeatRequest, ListRunsReply, ListRunsRequest,
    RecordSandboxRequest, ReleaseRequest, RunEvent, RunReply, RunState, SessionCommand,
    SpawnersReply, SpawnersRequest, StopCommand, StopReply, SubmitRequest, SweepReply,
    SweepRequest, TrackerError, TransitionRequest, session_command, stop_reply,
    tracker_error::{Code, Refusal},
};
use corral_proto::{Subjects, validate};
use prost::Message;

use crate::relay::Relay;
use crate::store::{Applied, Store, StoreError};

pub struct Handlers {
    pub store: Store,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub relay: Arc<Relay>,
}

fn error(code: Code, message: impl Into<String>) -> Option<TrackerError> {
    Some(TrackerError {
        code: code as i32,
        message: message.into(),
        refusal: Refusal::Unspecified as i32,
    })
}

fn store_error(err: &StoreError) -> Option<TrackerError> {
    let (code, refusal) = match err {
        StoreError::NotFound(_) => (Code::NotFound, Refusal::Unspecified),
        StoreError::Illegal(_) => (Code::IllegalTransition, Refusal::Unspecified),
        StoreError::Refused(Refusal::NotOwner, _) => (Code::Forbidden, Refusal::NotOwner),
        StoreError::Refused(refusal, _) => (Code::Conflict, *refusal),
        StoreError::Invalid(_) => (Code::Invalid, Refusal::Unspecified),
        // The database failed, lost a race or is out of reach: the same
        // request later may succeed (`is_transient`), so the caller retries.
        // A unique violation means a concurrent writer got there first; the
        // request again finds its row, so it too is no refusal.
        StoreError::Conflict(_)
        | StoreError::Retryable(_)
        | StoreError::Unavailable(_)
        | StoreError::NoDatabase(_)
        | StoreError::Db(_)
        | StoreError::Migrate(_) => (Code::Unavailable, Refusal::Unspecified),
    };
    if code == Code::Unavailable {
        tracing::warn!(error = %err, "database error");
    }
    Some(TrackerError {
        code: code as i32,
        message: err.to_string(),
        refusal: refusal as i32,
    })
}

/// A reply message: every one carries an optional error.
trait Reply: Message + Default {
    fn failed(error: Option<TrackerError>) -> Self;
}

macro_rules! replies {
    ($($reply:ty),*) => {
        $(impl Reply for $reply {
            // Some replies carry nothing but the error.
            #[allow(clippy::needless_update)]
            fn failed(error: Option<TrackerError>) -> Self {
                Self { error, ..Default::default() }
            }
        })*
    };
}

replies!(
    RunReply,
    ClaimReply,
    ListRunsReply,
    StopReply,
    HeartbeatReply,
    ActivityReply,
    SweepReply,
    CostReply,
    SpawnersReply
);

type Answer<R> = Result<R, Option<TrackerError>>;

/// Decodes the request, runs `handle`, and encodes its reply or its error.
async fn answer<Rq: Message + Default, Rp: Reply>(
    payload: &Bytes,
    handle: impl AsyncFnOnce(Rq) -> Answer<Rp>,
) -> Vec<u8> {
    let reply = match Rq::decode(payload.clone()) {
        Ok(request) => handle(request).await.unwrap_or_else(Rp::failed),
        Err(err) => {
            let name = std::any::type_name::<Rq>()
                .rsplit("::")
                .next()
                .unwrap_or("request");
            Rp::failed(error(
                Code::Invalid,
                format!("request did not decode as {name}: {err}"),
            ))
        }
    };
    reply.encode_to_vec()
}

fn stored<T>(result: Result<T, StoreError>) -> Answer<T> {
    result.map_err(|err| store_error(&err))
}

fn run_reply(run: corral_proto::v1::Run) -> Answer<RunReply> {
    Ok(RunReply {
        run: Some(run),
        ..Default::default()
    })
}

impl Handlers {
    /// Answers one request on `<prefix>.tracker.<op>`; returns the reply.
    pub async fn handle(&self, op: &str, payload: &Bytes) -> Vec<u8> {
        let started = std::time::Instant::now();
        let (reply, label) = match self.answer(op, payload).await {
            Some(reply) => (reply, op),
            // Unknown ops share one label: a caller cannot grow the series.
            None => (
                RunReply::failed(error(Code::Invalid, format!("unknown tracker op {op:?}")))
                    .encode_to_vec(),
                "unknown",
            ),
        };
        metrics::histogram!("corral_tracker_request_seconds", "op" => label.to_owned())
            .record(started.elapsed().as_secs_f64());
        reply
    }

    /// The reply to a known op; `None` for an op the tracker does not answer.
    async fn answer(&self, op: &str, payload: &Bytes) -> Option<Vec<u8>> {
        let reply = match op {
            "submit" => answer(payload, async |r| self.handle_submit(r).await).await,
            "claim" => answer(payload, async |r| self.handle_claim(r).await).await,
            "record_sandbox" => {
                answer(payload, async |r| self.handle_record_sandbox(r).await).await
            }
            "transition" => answer(payload, async |r| self.handle_transition(r).await).await,
            "get" => {
                answer(payload, async |r: GetRunRequest| {
                    run_reply(stored(self.store.get(&r.run_id).await)?)
                })
                .await
            }
            "list" => {
                answer(payload, async |r: ListRunsRequest| {
                    Ok(ListRunsReply {
                        runs: stored(self.store.list(&r).await)?,
                        error: None,
                    })
                })
                .await
            }
            "stop" => answer(payload, async |r| self.handle_stop(r).await).await,
            "heartbeat" => {
                answer(payload, async |r: HeartbeatRequest| {
                    stored(self.store.heartbeat(&r).await)?;
                    Ok(HeartbeatReply { error: None })
                })
                .await
            }
            "spawners" => {
                answer(payload, async |_: SpawnersRequest| {
                    Ok(SpawnersReply {
                        spawners: stored(self.store.spawners().await)?,
                        error: None,
                    })
                })
                .await
            }
            "activity" => {
                answer(payload, async |r: ActivityRequest| {
                    stored(self.store.activity(&r.run_ids).await)?;
                    Ok(ActivityReply { error: None })
                })
                .await
            }
            "sweep" => answer(payload, async |r| self.handle_sweep(r).await).await,
            "release" => {
                answer(payload, async |r: ReleaseRequest| {
                    run_reply(stored(self.store.release(&r.run_id, &r.owner).await)?)
                })
                .await
            }
            "cost" => {
                answer(payload, async |r: CostRequest| {
                    stored(self.store.cost(&r).await)
                })
                .await
            }
            _ => return None,
        };
        Some(reply)
    }

    async fn handle_submit(&self, request: SubmitRequest) -> Answer<RunReply> {
        let command = request
            .command
            .ok_or_else(|| error(Code::Invalid, "submit without a command"))?;
        validate::run_command(&command).map_err(|message| error(Code::Invalid, message))?;
        let (run, created) = stored(self.store.submit(&command).await)?;
        if let Some(applied) = created {
            self.applied(&applied).await;
        }
        run_reply(run)
    }

    async fn handle_claim(&self, request: ClaimRequest) -> Answer<ClaimReply> {
        if let Some(command) = &request.command {
            validate::run_command(command).map_err(|message| error(Code::Invalid, message))?;
        }
        let (outcome, run, applied) = stored(self.store.claim(&request).await)?;
        for applied in &applied {
            self.applied(applied).await;
        }
        Ok(ClaimReply {
            outcome: outcome as i32,
            run: Some(run),
            error: None,
        })
    }

    /// Records a run's sandbox and, when asked, starts the run: one round
    /// trip where a boot has nothing to wait for. A start not applied
    /// leaves the run booting and is not an error: the owner asks again
    /// with `transition` and gets the refusal's reason there.
    async fn handle_record_sandbox(&self, request: RecordSandboxRequest) -> Answer<RunReply> {
        let run = stored(self.store.record_sandbox(&request).await)?;
        if !request.replaced_because.is_empty() {
            // The replacement's row is in the outbox.
            self.relay.wake();
        }
        if !request.start {
            return run_reply(run);
        }
        let start = TransitionRequest {
            run_id: request.run_id.clone(),
            event: RunEvent::Start as i32,
            actor: format!("spawner:{}", request.owner),
            owner: request.owner.clone(),
            expected_version: run.version,
            ..Default::default()
        };
        match self.store.transition(&start).await {
            Ok(applied) => {
                self.applied(&applied).await;
                Ok(RunReply {
                    from: applied.from as i32,
                    run: Some(applied.run),
                    error: None,
                })
            }
            Err(err) => {
                tracing::debug!(run_id = %request.run_id, error = %err, "start with the sandbox not applied");
                run_reply(run)
            }
        }
    }

    async fn handle_transition(&self, request: TransitionRequest) -> Answer<RunReply> {
        let applied = stored(self.store.transition(&request).await)?;
        self.applied(&applied).await;
        Ok(RunReply {
            from: applied.from as i32,
            run: Some(applied.run),
            error: None,
        })
    }

    async fn handle_stop(&self, stop: StopCommand) -> Answer<StopReply> {
        validate::stop_command(&stop).map_err(|message| error(Code::Invalid, message))?;
        let (outcome, run) = stored(self.record_stop(&stop, true).await)?;
        Ok(StopReply {
            outcome: outcome as i32,
            run,
            error: None,
        })
    }

    async fn handle_sweep(&self, request: SweepRequest) -> Answer<SweepReply> {
        // The due runs come with the first page only.
        let due = if request.live_only || !request.live_after.is_empty() {
            Vec::new()
        } else {
            stored(self.store.sweep(&request).await)?
        };
        let (live, live_next) = if request.include_live {
            stored(
                self.store
                    .live(&request.live_after, request.live_limit)
                    .await,
            )?
        } else {
            (Vec::new(), String::new())
        };
        Ok(SweepReply {
            due,
            live,
            live_next,
            error: None,
        })
    }

    /// Records a stop, publishes what it applied, and (when `route` and the
    /// run has an owner) routes the stop to the owner on its stop subject.
    pub async fn record_stop(
        &self,
        stop: &StopCommand,
        route: bool,
    ) -> Result<(stop_reply::Outcome, Option<corral_proto::v1::Run>), StoreError> {
        // A stop published on the subject (not routed by us) may precede the
        // run's record: keep it for when the run appears.
        let remember_unknown = !route;
        let (mut outcome, mut run, mut applied) =
            self.store.request_stop(stop, remember_unknown).await?;
        if remember_unknown && outcome == stop_reply::Outcome::NotFound && run.is_some() {
            // Created between the look-up and the note: record it normally.
            (outcome, run, applied) = self.store.request_stop(stop, false).await?;
        }
        if let Some(applied) = &applied {
            self.applied(applied).await;
        }
        let owned = run.as_ref().is_some_and(|r| !r.owner.is_empty());
        let between_turns = run
            .as_ref()
            .is_some_and(|r| matches!(r.state(), RunState::Idle | RunState::Paused));
        if outcome == stop_reply::Outcome::Accepted && between_turns {
            // Nobody owns a kept run between turns: a spawner ends it.
            self.request_end(stop).await;
        } else if route && outcome == stop_reply::Outcome::Accepted && owned {
            let subject = self.subjects.cmd_stop(&stop.run_id);
            let msg_id = format!("stop-{}", stop.run_id);
            if let Err(err) =
                publish_durable(&self.js, subject, &msg_id, stop.encode_to_vec().into()).await
            {
                // Recorded durably: the reaper ends the run if the owner never hears.
                tracing::warn!(run_id = %stop.run_id, error = %err, "stop routing failed");
            }
        }
        Ok((outcome, run))
    }

    /// Asks the spawners (work queue) to end a kept run between turns: kill
    /// its sandbox and record it stopped. If this publish fails, the
    /// reaper's stop backstop ends the run after its grace.
    async fn request_end(&self, stop: &StopCommand) {
        let end = SessionCommand {
            run_id: stop.run_id.clone(),
            action: session_command::Action::End as i32,
            requested_by: stop.requested_by.clone(),
            requested_at_ms: corral_common::now_ms(),
        };
        let subject = self.subjects.cmd_session();
        let msg_id = format!("end-{}", stop.run_id);
        if let Err(err) =
            publish_durable(&self.js, subject, &msg_id, end.encode_to_vec().into()).await
        {
            tracing::warn!(run_id = %stop.run_id, error = %err, "end of a kept run not published");
        }
    }

    /// A transition was committed: its row is in the outbox; the relay
    /// announces it. Counted and logged here.
    pub async fn applied(&self, applied: &Applied) {
        let run = &applied.run;
        corral_common::fault::point("tracker.after_commit");
        self.relay.wake();
        metrics::counter!("corral_transitions_total", "to" => run.state().name()).increment(1);
        tracing::info!(
            run_id = %run.run_id,
            from = applied.from.name(),
            to = run.state().name(),
            event = applied.event.name(),
            actor = %applied.actor,
            reason = %run.reason,
            "run transition"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(err: StoreError) -> Code {
        let answered = store_error(&err).expect("a store error should be answered");
        Code::try_from(answered.code).expect("the code should be known")
    }

    #[test]
    fn database_errors_are_answered_unavailable_so_callers_retry() {
        let transient = [
            StoreError::Conflict(sqlx::Error::PoolClosed),
            StoreError::Retryable(sqlx::Error::PoolClosed),
            StoreError::Unavailable(sqlx::Error::PoolTimedOut),
            StoreError::NoDatabase(sqlx::Error::PoolClosed),
            StoreError::Db(sqlx::Error::RowNotFound),
        ];
        for err in transient {
            assert!(err.is_transient(), "{err:?}");
            assert_eq!(code_of(err), Code::Unavailable);
        }
    }

    #[test]
    fn refusals_are_answered_with_their_code_and_are_not_transient() {
        let refused = StoreError::Refused(Refusal::NotOwner, "not yours".into());
        assert!(!refused.is_transient());
        assert_eq!(code_of(refused), Code::Forbidden);
        let fenced = StoreError::Refused(Refusal::StopRequested, "stop requested".into());
        assert!(!fenced.is_transient());
        assert_eq!(code_of(fenced), Code::Conflict);
        let missing = StoreError::NotFound("r".into());
        assert!(!missing.is_transient());
        assert_eq!(code_of(missing), Code::NotFound);
    }
}
