//! The client library of corral: what the CLI, the spawner and the tests use
//! to talk to the tracker (request-reply), publish commands (JetStream, with
//! PubAck) and watch runs (lifecycle and agent events).

use std::time::Duration;

use async_nats::jetstream;
use corral_common::nats::{self, NatsError};
use corral_proto::Subjects;
use corral_proto::v1::{
    ActivityReply, ActivityRequest, AgentEvent, ClaimReply, ClaimRequest, ContinueCommand,
    CostReply, CostRequest, DueRun, GetRunRequest, HeartbeatReply, HeartbeatRequest,
    LifecycleEvent, ListRunsReply, ListRunsRequest, RecordSandboxRequest, ReleaseRequest, Run,
    RunCommand, RunReply, RunState, SessionCommand, Spawner, SpawnersReply, SpawnersRequest,
    StopCommand, StopReply, SubmitRequest, SweepReply, SweepRequest, TrackerError,
    TransitionRequest, claim_reply, stop_reply,
    tracker_error::{Code, Refusal},
};
use futures::StreamExt;
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("{message}")]
    Tracker {
        code: Code,
        /// Why a conflict or a forbidden request was refused.
        refusal: Refusal,
        message: String,
    },
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("nats: {0}")]
    Subscribe(String),
    #[error("timed out after {0:?} waiting for run {1}")]
    Timeout(Duration, String),
}

impl ClientError {
    /// Whether the same call may succeed later (tracker or database
    /// unavailable, NATS timeouts), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Nats(err) => err.is_transient(),
            ClientError::Tracker { code, .. } => *code == Code::Unavailable,
            ClientError::Timeout(..) => true,
            ClientError::Invalid(_) | ClientError::Subscribe(_) => false,
        }
    }

    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Tracker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Why the tracker refused, when it did (`Refusal::Unspecified` for
    /// any other error).
    pub fn refusal(&self) -> Refusal {
        match self {
            ClientError::Tracker { refusal, .. } => *refusal,
            _ => Refusal::Unspecified,
        }
    }
}

fn check(error: Option<TrackerError>) -> Result<(), ClientError> {
    match error {
        None => Ok(()),
        Some(error) => Err(ClientError::Tracker {
            code: Code::try_from(error.code).unwrap_or(Code::Unspecified),
            refusal: Refusal::try_from(error.refusal).unwrap_or(Refusal::Unspecified),
            message: error.message,
        }),
    }
}

fn run_of(reply: RunReply) -> Result<Run, ClientError> {
    check(reply.error)?;
    reply.run.ok_or_else(|| ClientError::Tracker {
        code: Code::Unspecified,
        refusal: Refusal::Unspecified,
        message: "tracker reply carried no run".into(),
    })
}

/// Coalesces progress reports: [`ActivityReporter::note`] is cheap and may
/// be called per event; the reporter tells the tracker once a second about
/// every run noted since, so a run costs at most one update per second.
pub struct ActivityReporter {
    pending: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ActivityReporter {
    /// Starts the reporter; it stops when `shutdown` is cancelled.
    pub fn start(
        client: Client,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::sync::Arc<ActivityReporter> {
        let reporter = std::sync::Arc::new(ActivityReporter {
            pending: Default::default(),
        });
        let flushing = reporter.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let run_ids: Vec<String> = match flushing.pending.lock() {
                    Ok(mut pending) => pending.drain().collect(),
                    Err(_) => return,
                };
                if !run_ids.is_empty()
                    && let Err(err) = client.activity(run_ids).await
                {
                    tracing::warn!(error = %err, "activity report failed");
                }
            }
        });
        reporter
    }

    /// Notes progress of `run_id`.
    pub fn note(&self, run_id: &str) {
        if let Ok(mut pending) = self.pending.lock()
            && !pending.contains(run_id)
        {
            pending.insert(run_id.to_owned());
        }
    }
}

/// A fresh, time-ordered run id.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// What a watcher of one run sees.
#[derive(Clone, Debug)]
pub enum RunUpdate {
    Lifecycle(LifecycleEvent),
    Agent(AgentEvent),
}

/// Lifecycle and agent events of one run, from the moment of subscription.
pub struct RunWatch {
    lifecycle: async_nats::Subscriber,
    events: async_nats::Subscriber,
}

impl RunWatch {
    /// The next update; `None` when the subscriptions closed.
    pub async fn next(&mut self) -> Option<RunUpdate> {
        loop {
            let message = tokio::select! {
                m = self.lifecycle.next() => m.map(|m| (true, m)),
                m = self.events.next() => m.map(|m| (false, m)),
            };
            let (lifecycle, message) = message?;
            let update = if lifecycle {
                LifecycleEvent::decode(message.payload)
                    .ok()
                    .map(RunUpdate::Lifecycle)
            } else {
                AgentEvent::decode(message.payload)
                    .ok()
                    .map(RunUpdate::Agent)
            };
            if let Some(update) = update {
                return Some(update);
            }
        }
    }
}

/// A connection to one corral deployment.
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
}

impl Client {
    /// Connects to NATS; `name` shows in server monitoring.
    pub async fn connect(nats_url: &str, prefix: &str, name: &str) -> Result<Client, ClientError> {
        Client::connect_with(nats_url, &nats::NatsAuth::default(), prefix, name).await
    }

    /// [`Client::connect`] with NATS credentials and TLS settings.
    pub async fn connect_with(
        nats_url: &str,
        auth: &nats::NatsAuth,
        prefix: &str,
        name: &str,
    ) -> Result<Client, ClientError> {
        let subjects = Subjects::new(prefix).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let nats = nats::connect_with(nats_url, auth, name, Duration::from_secs(5)).await?;
        Ok(Client::from_parts(nats, subjects))
    }

    pub fn from_parts(nats: async_nats::Client, subjects: Subjects) -> Client {
        let js = jetstream::new(nats.clone());
        Client { nats, js, subjects }
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    async fn request<Rq: Message, Rp: Message + Default>(
        &self,
        op: &str,
        request: &Rq,
    ) -> Result<Rp, ClientError> {
        Ok(nats::request(&self.nats, self.subjects.tracker(op), request).await?)
    }

    // ---- commands ----

    /// Records the run as pending and publishes its command; returns once
    /// both are durable. Idempotent for a given run id.
    pub async fn start_run(&self, command: &RunCommand) -> Result<Run, ClientError> {
        corral_proto::validate::run_command(command).map_err(ClientError::Invalid)?;
        // Concurrently: a spawner that claims before the record exists
        // creates it, and the submit then finds it.
        let (run, ()) = tokio::try_join!(self.submit(command), self.publish_run(command))?;
        Ok(run)
    }

    /// Publishes a `RunCommand` on the work queue (de-duplicated by run id).
    pub async fn publish_run(&self, command: &RunCommand) -> Result<(), ClientError> {
        nats::publish_durable(
            &self.js,
            self.subjects.cmd_run(),
            &command.run_id,
            command.encode_to_vec().into(),
        )
        .await?;
        Ok(())
    }

    /// Publishes a `ContinueCommand`: the next turn of a kept run. A
    /// republished command (same run and `submitted_at_ms`) runs once.
    pub async fn continue_run(&self, command: &ContinueCommand) -> Result<(), ClientError> {
        corral_proto::validate::continue_command(command).map_err(ClientError::Invalid)?;
        let msg_id = format!("continue-{}-{}", command.run_id, command.submitted_at_ms);
        nats::publish_durable(
            &self.js,
            self.subjects.cmd_continue(),
            &msg_id,
            command.encode_to_vec().into(),
        )
        .await?;
        Ok(())
    }

    /// Publishes a `SessionCommand` (pause, resume, end) for a kept run.
    pub async fn session(&self, command: &SessionCommand) -> Result<(), ClientError> {
        corral_proto::validate::session_command(command).map_err(ClientError::Invalid)?;
        let msg_id = format!(
            "{}-{}-{}",
            command.action().as_str_name(),
            command.run_id,
            command.requested_at_ms
        );
        nats::publish_durable(
            &self.js,
            self.subjects.cmd_session(),
            &msg_id,
            command.encode_to_vec().into(),
        )
        .await?;
        Ok(())
    }

    /// Subscribes to a run's lifecycle and agent events. Subscribe before
    /// starting the run to see everything.
    pub async fn watch(&self, run_id: &str) -> Result<RunWatch, ClientError> {
        let subscribe = |subject: String| async {
            self.nats
                .subscribe(subject)
                .await
                .map_err(|e| ClientError::Subscribe(e.to_string()))
        };
        let watch = RunWatch {
            lifecycle: subscribe(self.subjects.lifecycle(run_id)).await?,
            events: subscribe(self.subjects.events_of_run(run_id)).await?,
        };
        // The server must know the subscriptions before anything is published.
        self.nats
            .flush()
            .await
            .map_err(|e| ClientError::Subscribe(e.to_string()))?;
        Ok(watch)
    }

    /// Waits until the run is terminal. Uses the lifecycle subject and, as a
    /// backstop against a missed message, asks the tracker every second.
    pub async fn wait_terminal(&self, run_id: &str, limit: Duration) -> Result<Run, ClientError> {
        self.wait_until(run_id, limit, |run| run.state().is_terminal())
            .await
    }

    /// Waits until the tracker's record of the run satisfies `done`: read
    /// again each time the run's lifecycle moves (its lifecycle subject),
    /// and every second as a backstop against a missed message.
    pub async fn wait_until(
        &self,
        run_id: &str,
        limit: Duration,
        done: impl Fn(&Run) -> bool,
    ) -> Result<Run, ClientError> {
        let mut watch = self.watch(run_id).await?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.get(run_id).await {
                Ok(run) if done(&run) => return Ok(run),
                Ok(_) => {}
                // Not recorded yet (a command no spawner has claimed), or
                // the tracker away for a moment: look again.
                Err(err) if err.is_transient() || err.code() == Some(Code::NotFound) => {}
                Err(err) => return Err(err),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout(limit, run_id.to_owned()));
            }
            let tick = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                match tokio::time::timeout_at(tick.min(deadline), watch.next()).await {
                    Ok(Some(RunUpdate::Lifecycle(_))) => break,
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    // ---- tracker ----

    pub async fn submit(&self, command: &RunCommand) -> Result<Run, ClientError> {
        let request = SubmitRequest {
            command: Some(command.clone()),
        };
        run_of(self.request("submit", &request).await?)
    }

    pub async fn claim(
        &self,
        command: &RunCommand,
        owner: &str,
    ) -> Result<(claim_reply::Outcome, Run), ClientError> {
        let request = ClaimRequest {
            command: Some(command.clone()),
            owner: owner.to_owned(),
        };
        let reply: ClaimReply = self.request("claim", &request).await?;
        check(reply.error)?;
        let outcome = claim_reply::Outcome::try_from(reply.outcome)
            .unwrap_or(claim_reply::Outcome::Unspecified);
        Ok((outcome, reply.run.unwrap_or_default()))
    }

    pub async fn record_sandbox(&self, request: &RecordSandboxRequest) -> Result<Run, ClientError> {
        run_of(self.request("record_sandbox", request).await?)
    }

    pub async fn transition(&self, request: &TransitionRequest) -> Result<Run, ClientError> {
        Ok(self.transition_from(request).await?.0)
    }

    /// Like [`Client::transition`], also returning the state the run left.
    pub async fn transition_from(
        &self,
        request: &TransitionRequest,
    ) -> Result<(Run, RunState), ClientError> {
        let reply: RunReply = self.request("transition", request).await?;
        let from = RunState::try_from(reply.from).unwrap_or(RunState::Unspecified);
        Ok((run_of(reply)?, from))
    }

    /// Lets go of a kept run this instance paused or resumed.
    pub async fn release(&self, run_id: &str, owner: &str) -> Result<Run, ClientError> {
        let request = ReleaseRequest {
            run_id: run_id.to_owned(),
            owner: owner.to_owned(),
        };
        run_of(self.request("release", &request).await?)
    }

    /// Cost of the runs matching `request`.
    pub async fn cost(&self, request: &CostRequest) -> Result<CostReply, ClientError> {
        let reply: CostReply = self.request("cost", request).await?;
        check(reply.error.clone())?;
        Ok(reply)
    }

    pub async fn get(&self, run_id: &str) -> Result<Run, ClientError> {
        let request = GetRunRequest {
            run_id: run_id.to_owned(),
        };
        run_of(self.request("get", &request).await?)
    }

    pub async fn list(&self, request: &ListRunsRequest) -> Result<Vec<Run>, ClientError> {
        let reply: ListRunsReply = self.request("list", request).await?;
        check(reply.error)?;
        Ok(reply.runs)
    }

    /// Asks the tracker to record a stop; when it answers `Accepted` the stop
    /// is durable and on its way to the owner.
    pub async fn stop(
        &self,
        stop: &StopCommand,
    ) -> Result<(stop_reply::Outcome, Option<Run>), ClientError> {
        corral_proto::validate::stop_command(stop).map_err(ClientError::Invalid)?;
        let reply: StopReply = self.request("stop", stop).await?;
        check(reply.error)?;
        let outcome = stop_reply::Outcome::try_from(reply.outcome)
            .unwrap_or(stop_reply::Outcome::Unspecified);
        Ok((outcome, reply.run))
    }

    /// Reports progress of `run_ids` (resets their inactivity window).
    pub async fn activity(&self, run_ids: Vec<String>) -> Result<(), ClientError> {
        let reply: ActivityReply = self
            .request("activity", &ActivityRequest { run_ids })
            .await?;
        check(reply.error)
    }

    /// The live runs the reaper must act on now and, with
    /// `include_live`, every live run, fetched page by page so that no
    /// reply exceeds NATS's payload limit however many runs are live.
    pub async fn sweep(
        &self,
        request: &SweepRequest,
    ) -> Result<(Vec<DueRun>, Vec<Run>), ClientError> {
        let reply: SweepReply = self.request("sweep", request).await?;
        check(reply.error)?;
        let (due, mut live, mut next) = (reply.due, reply.live, reply.live_next);
        while request.include_live && !next.is_empty() {
            let page = SweepRequest {
                live_after: std::mem::take(&mut next),
                live_only: true,
                ..request.clone()
            };
            let reply: SweepReply = self.request("sweep", &page).await?;
            check(reply.error)?;
            live.extend(reply.live);
            next = reply.live_next;
        }
        Ok((due, live))
    }

    /// Proves the spawner alive; `drain_deadline_ms` set while it drains.
    pub async fn heartbeat(
        &self,
        spawner_id: &str,
        owned_runs: u32,
        drain_deadline_ms: Option<i64>,
    ) -> Result<(), ClientError> {
        let request = HeartbeatRequest {
            spawner_id: spawner_id.to_owned(),
            owned_runs,
            draining: drain_deadline_ms.is_some(),
            drain_deadline_ms: drain_deadline_ms.unwrap_or_default(),
        };
        let reply: HeartbeatReply = self.request("heartbeat", &request).await?;
        check(reply.error)
    }

    /// The spawners that heartbeat within the last ten minutes.
    pub async fn spawners(&self) -> Result<Vec<Spawner>, ClientError> {
        let reply: SpawnersReply = self.request("spawners", &SpawnersRequest {}).await?;
        check(reply.error)?;
        Ok(reply.spawners)
    }
}
