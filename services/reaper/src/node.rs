//! Node-local work for a node-local provider (local sandboxes, which only a
//! process on their machine can list, probe or kill).
//!
//! Every reaper of a node, leader or not, answers kill requests for that
//! node's sandboxes on `<prefix>.node.<node>.kill` (queue group `reaper`),
//! and reconciles the node's sandboxes against the records every period
//! ([`crate::sweep::Reaper::reconcile_node`]). The cluster's leader keeps
//! what needs one decider (deadlines, dead owners, ignored stops) and asks
//! the owning node ([`ask_kill`]) when the sandbox of a run it ends is on
//! another node.

use std::sync::Arc;
use std::time::Duration;

use corral_client::Client;
use corral_proto::v1::{NodeKillReply, NodeKillRequest};
use corral_provider::{KillOutcome, Provider};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

/// Queue group of the reapers of one node.
const QUEUE_GROUP: &str = "reaper";
/// How long the leader waits for a node's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks node `node` to kill one of its sandboxes.
pub async fn ask_kill(
    client: &Client,
    node: &str,
    sandbox_id: &str,
    run_id: &str,
    actor: &str,
) -> Result<bool, String> {
    let request = NodeKillRequest {
        sandbox_id: sandbox_id.to_owned(),
        run_id: run_id.to_owned(),
        requested_by: actor.to_owned(),
    };
    let subject = client.subjects().node(node, "kill");
    let asked = corral_common::nats::request::<_, NodeKillReply>(client.nats(), subject, &request);
    let reply = tokio::time::timeout(ASK_TIMEOUT, asked)
        .await
        .map_err(|_| format!("no answer within {ASK_TIMEOUT:?}"))?
        .map_err(|err| err.to_string())?;
    if reply.error.is_empty() {
        Ok(reply.killed)
    } else {
        Err(reply.error)
    }
}

/// Answers kill requests for this node's sandboxes until `shutdown`.
pub async fn serve(
    client: Client,
    provider: Arc<dyn Provider>,
    node: String,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let subject = client.subjects().node(&node, "kill");
    let mut requests = client
        .nats()
        .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
        .await
        .map_err(|err| format!("subscribing to {subject}: {err}"))?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let provider = provider.clone();
        let nats = client.nats().clone();
        // Kills are independent and bounded by the provider's own slots.
        tokio::spawn(async move {
            let reply = match NodeKillRequest::decode(message.payload) {
                Err(err) => NodeKillReply {
                    killed: false,
                    error: format!("malformed NodeKillRequest: {err}"),
                },
                Ok(request) => match provider.kill(&request.sandbox_id).await {
                    Ok(outcome) => {
                        tracing::info!(sandbox_id = %request.sandbox_id, run_id = %request.run_id, requested_by = %request.requested_by, ?outcome, "sandbox killed for another node's reaper");
                        NodeKillReply {
                            killed: outcome == KillOutcome::Killed,
                            error: String::new(),
                        }
                    }
                    Err(err) => NodeKillReply {
                        killed: false,
                        error: err.to_string(),
                    },
                },
            };
            if let Some(inbox) = message.reply
                && let Err(err) = nats.publish(inbox, reply.encode_to_vec().into()).await
            {
                tracing::warn!(error = %err, "node kill reply failed");
            }
        });
    }
    Ok(())
}
