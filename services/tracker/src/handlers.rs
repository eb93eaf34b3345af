//! One `handle_<op>` per tracker request, plus the stop commands clients
//! published on the command stream. Every applied transition is published on
//! `<prefix>.lifecycle.<run_id>` after it is committed and before the reply.

use async_nats::jetstream;
use bytes::Bytes;
use corral_common::nats::publish_durable;
use corral_proto::v1::{
    ActivityReply, ActivityRequest, ClaimReply, ClaimRequest, GetRunRequest, HeartbeatReply,
    HeartbeatRequest, LifecycleEvent, ListRunsReply, ListRunsRequest, RecordSandboxRequest,
    RunReply, StopCommand, StopReply, SubmitRequest, SweepReply, SweepRequest, TrackerError,
    TransitionRequest, stop_reply, tracker_error::Code,
};
use corral_proto::{Subjects, validate};
use prost::Message;

use crate::store::{Applied, Store, StoreError};

pub struct Handlers {
    pub store: Store,
    pub js: jetstream::Context,
    pub subjects: Subjects,
}

fn error(code: Code, message: impl Into<String>) -> Option<TrackerError> {
    Some(TrackerError {
        code: code as i32,
        message: message.into(),
    })
}

fn store_error(err: &StoreError) -> Option<TrackerError> {
    let code = match err {
        StoreError::NotFound(_) => Code::NotFound,
        StoreError::Illegal(_) => Code::IllegalTransition,
        StoreError::Conflict(_) => Code::Conflict,
        StoreError::Invalid(_) => Code::Invalid,
        StoreError::Db(_) | StoreError::Migrate(_) => Code::Unavailable,
    };
    if code == Code::Unavailable {
        tracing::warn!(error = %err, "database error");
    }
    error(code, err.to_string())
}

fn decode<M: Message + Default>(payload: &Bytes, name: &str) -> Result<M, Option<TrackerError>> {
    M::decode(payload.clone()).map_err(|err| {
        error(
            Code::Invalid,
            format!("request did not decode as {name}: {err}"),
        )
    })
}

impl Handlers {
    /// Answers one request on `<prefix>.tracker.<op>`; returns the reply.
    pub async fn handle(&self, op: &str, payload: &Bytes) -> Vec<u8> {
        match op {
            "submit" => self.handle_submit(payload).await.encode_to_vec(),
            "claim" => self.handle_claim(payload).await.encode_to_vec(),
            "record_sandbox" => self.handle_record_sandbox(payload).await.encode_to_vec(),
            "transition" => self.handle_transition(payload).await.encode_to_vec(),
            "get" => self.handle_get(payload).await.encode_to_vec(),
            "list" => self.handle_list(payload).await.encode_to_vec(),
            "stop" => self.handle_stop(payload).await.encode_to_vec(),
            "heartbeat" => self.handle_heartbeat(payload).await.encode_to_vec(),
            "activity" => self.handle_activity(payload).await.encode_to_vec(),
            "sweep" => self.handle_sweep(payload).await.encode_to_vec(),
            other => RunReply {
                run: None,
                error: error(Code::Invalid, format!("unknown tracker op {other:?}")),
            }
            .encode_to_vec(),
        }
    }

    async fn handle_submit(&self, payload: &Bytes) -> RunReply {
        let request: SubmitRequest = match decode(payload, "SubmitRequest") {
            Ok(r) => r,
            Err(error) => return RunReply { run: None, error },
        };
        let Some(command) = request.command else {
            return RunReply {
                run: None,
                error: error(Code::Invalid, "submit without a command"),
            };
        };
        if let Err(message) = validate::run_command(&command) {
            return RunReply {
                run: None,
                error: error(Code::Invalid, message),
            };
        }
        match self.store.submit(&command).await {
            Ok((run, created)) => {
                if let Some(applied) = created {
                    self.publish_lifecycle(&applied).await;
                }
                RunReply {
                    run: Some(run),
                    error: None,
                }
            }
            Err(err) => RunReply {
                run: None,
                error: store_error(&err),
            },
        }
    }

    async fn handle_claim(&self, payload: &Bytes) -> ClaimReply {
        let request: ClaimRequest = match decode(payload, "ClaimRequest") {
            Ok(r) => r,
            Err(error) => {
                return ClaimReply {
                    error,
                    ..Default::default()
                };
            }
        };
        if let Some(command) = &request.command
            && let Err(message) = validate::run_command(command)
        {
            return ClaimReply {
                error: error(Code::Invalid, message),
                ..Default::default()
            };
        }
        match self.store.claim(&request).await {
            Ok((outcome, run, applied)) => {
                for applied in &applied {
                    self.publish_lifecycle(applied).await;
                }
                ClaimReply {
                    outcome: outcome as i32,
                    run: Some(run),
                    error: None,
                }
            }
            Err(err) => ClaimReply {
                error: store_error(&err),
                ..Default::default()
            },
        }
    }

    async fn handle_record_sandbox(&self, payload: &Bytes) -> RunReply {
        let request: RecordSandboxRequest = match decode(payload, "RecordSandboxRequest") {
            Ok(r) => r,
            Err(error) => return RunReply { run: None, error },
        };
        match self.store.record_sandbox(&request).await {
            Ok(run) => RunReply {
                run: Some(run),
                error: None,
            },
            Err(err) => RunReply {
                run: None,
                error: store_error(&err),
            },
        }
    }

    async fn handle_transition(&self, payload: &Bytes) -> RunReply {
        let request: TransitionRequest = match decode(payload, "TransitionRequest") {
            Ok(r) => r,
            Err(error) => return RunReply { run: None, error },
        };
        match self.store.transition(&request).await {
            Ok(applied) => {
                self.publish_lifecycle(&applied).await;
                RunReply {
                    run: Some(applied.run),
                    error: None,
                }
            }
            Err(err) => RunReply {
                run: None,
                error: store_error(&err),
            },
        }
    }

    async fn handle_get(&self, payload: &Bytes) -> RunReply {
        let request: GetRunRequest = match decode(payload, "GetRunRequest") {
            Ok(r) => r,
            Err(error) => return RunReply { run: None, error },
        };
        match self.store.get(&request.run_id).await {
            Ok(run) => RunReply {
                run: Some(run),
                error: None,
            },
            Err(err) => RunReply {
                run: None,
                error: store_error(&err),
            },
        }
    }

    async fn handle_list(&self, payload: &Bytes) -> ListRunsReply {
        let request: ListRunsRequest = match decode(payload, "ListRunsRequest") {
            Ok(r) => r,
            Err(error) => {
                return ListRunsReply {
                    runs: vec![],
                    error,
                };
            }
        };
        match self.store.list(&request).await {
            Ok(runs) => ListRunsReply { runs, error: None },
            Err(err) => ListRunsReply {
                runs: vec![],
                error: store_error(&err),
            },
        }
    }

    async fn handle_stop(&self, payload: &Bytes) -> StopReply {
        let stop: StopCommand = match decode(payload, "StopCommand") {
            Ok(r) => r,
            Err(error) => {
                return StopReply {
                    error,
                    ..Default::default()
                };
            }
        };
        if let Err(message) = validate::stop_command(&stop) {
            return StopReply {
                error: error(Code::Invalid, message),
                ..Default::default()
            };
        }
        match self.record_stop(&stop, true).await {
            Ok((outcome, run)) => StopReply {
                outcome: outcome as i32,
                run,
                error: None,
            },
            Err(err) => StopReply {
                error: store_error(&err),
                ..Default::default()
            },
        }
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
            self.publish_lifecycle(applied).await;
        }
        let owned = run.as_ref().is_some_and(|r| !r.owner.is_empty());
        if route && outcome == stop_reply::Outcome::Accepted && owned {
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

    async fn handle_heartbeat(&self, payload: &Bytes) -> HeartbeatReply {
        let request: HeartbeatRequest = match decode(payload, "HeartbeatRequest") {
            Ok(r) => r,
            Err(error) => return HeartbeatReply { error },
        };
        match self
            .store
            .heartbeat(&request.spawner_id, request.owned_runs)
            .await
        {
            Ok(()) => HeartbeatReply { error: None },
            Err(err) => HeartbeatReply {
                error: store_error(&err),
            },
        }
    }

    async fn handle_activity(&self, payload: &Bytes) -> ActivityReply {
        let request: ActivityRequest = match decode(payload, "ActivityRequest") {
            Ok(r) => r,
            Err(error) => return ActivityReply { error },
        };
        match self.store.activity(&request.run_ids).await {
            Ok(()) => ActivityReply { error: None },
            Err(err) => ActivityReply {
                error: store_error(&err),
            },
        }
    }

    async fn handle_sweep(&self, payload: &Bytes) -> SweepReply {
        let request: SweepRequest = match decode(payload, "SweepRequest") {
            Ok(r) => r,
            Err(error) => {
                return SweepReply {
                    error,
                    ..Default::default()
                };
            }
        };
        let live = if request.include_live {
            self.store.live().await
        } else {
            Ok(Vec::new())
        };
        match (self.store.sweep(&request).await, live) {
            (Ok(due), Ok(live)) => SweepReply {
                due,
                live,
                error: None,
            },
            (Err(err), _) | (_, Err(err)) => SweepReply {
                error: store_error(&err),
                ..Default::default()
            },
        }
    }

    /// Publishes a committed transition; a failure is logged, not returned:
    /// the database is the record, the lifecycle stream its announcement.
    pub async fn publish_lifecycle(&self, applied: &Applied) {
        let run = &applied.run;
        let event = LifecycleEvent {
            run_id: run.run_id.clone(),
            from: applied.from as i32,
            to: run.state,
            event: applied.event as i32,
            reason: run.reason.clone(),
            actor: applied.actor.clone(),
            at_ms: run.updated_at_ms,
            version: run.version,
            exit_code: run.exit_code,
            sandbox_id: run.sandbox_id.clone(),
        };
        let msg_id = format!("{}-{}", run.run_id, run.version);
        let subject = self.subjects.lifecycle(&run.run_id);
        if let Err(err) =
            publish_durable(&self.js, subject, &msg_id, event.encode_to_vec().into()).await
        {
            tracing::error!(run_id = %run.run_id, version = run.version, error = %err, "lifecycle publish failed");
        }
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
