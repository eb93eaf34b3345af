//! Helpers for kept sessions and for comparing a provider with the records.

use std::collections::HashSet;
use std::time::Duration;

use corral_client::Client;
use corral_proto::v1::{
    ContinueCommand, Run, RunState, SessionCommand, StopCommand, SweepRequest, session_command,
};
use corral_provider::{LABEL_DEPLOYMENT, Labels, Provider, SandboxInfo};

use crate::eventually;

const LIMIT: Duration = Duration::from_secs(60);

/// Waits until the run has finished turn `turn` and nobody holds it;
/// panics if it ends instead.
pub async fn idle_after(client: &Client, run_id: &str, turn: u32) -> Run {
    eventually(
        &format!("run {run_id} idle after turn {turn}"),
        LIMIT,
        || async {
            let run = client.get(run_id).await.ok()?;
            assert!(
                !run.state().is_terminal(),
                "run {run_id} ended {} ({}) instead of going idle",
                run.state().name(),
                run.reason
            );
            (run.state() == RunState::Idle && run.turn >= turn && run.owner.is_empty())
                .then_some(run)
        },
    )
    .await
}

/// Waits until the run is `state` and nobody holds it.
pub async fn released(client: &Client, run_id: &str, state: RunState) -> Run {
    eventually(
        &format!("run {run_id} {} and released", state.name()),
        LIMIT,
        || async {
            let run = client.get(run_id).await.ok()?;
            (run.state() == state && run.owner.is_empty()).then_some(run)
        },
    )
    .await
}

pub async fn continue_run(client: &Client, run_id: &str, argv: &[&str]) {
    let command = ContinueCommand {
        run_id: run_id.to_owned(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        requested_by: "test".into(),
        submitted_at_ms: corral_common::now_ms(),
    };
    client.continue_run(&command).await.expect("continue");
}

pub async fn session(client: &Client, run_id: &str, action: session_command::Action) {
    let command = SessionCommand {
        run_id: run_id.to_owned(),
        action: action as i32,
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    client.session(&command).await.expect("session command");
}

/// Asks the tracker to stop the run.
pub async fn stop_run(client: &Client, run_id: &str, reason: &str) {
    let stop = StopCommand {
        run_id: run_id.to_owned(),
        reason: reason.into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    client.stop(&stop).await.expect("stop");
}

/// The provider's sandboxes of `deployment` and the live runs, when they
/// agree exactly: every sandbox claimed by a live run, every live run past
/// `pending` holding a listed sandbox.
pub async fn provider_and_records_agree(
    client: &Client,
    provider: &dyn Provider,
    deployment: &str,
) -> Option<(Vec<SandboxInfo>, Vec<Run>)> {
    let mut labels = Labels::new();
    labels.insert(LABEL_DEPLOYMENT.into(), deployment.to_owned());
    let sandboxes = provider.list(&labels).await.ok()?;
    let request = SweepRequest {
        include_live: true,
        ..Default::default()
    };
    let (_, live) = client.sweep(&request).await.ok()?;
    let listed: HashSet<&str> = sandboxes.iter().map(|s| s.id.as_str()).collect();
    let claimed: HashSet<&str> = live.iter().map(|r| r.sandbox_id.as_str()).collect();
    let orphans = sandboxes
        .iter()
        .filter(|s| !claimed.contains(s.id.as_str()))
        .count();
    let missing = live
        .iter()
        .filter(|r| r.state() != RunState::Pending)
        .filter(|r| r.sandbox_id.is_empty() || !listed.contains(r.sandbox_id.as_str()))
        .count();
    (orphans == 0 && missing == 0).then_some((sandboxes, live))
}

/// After a chaos: waits until every sandbox of the deployment is claimed by
/// a live run and every live run past `pending` holds a listed sandbox (0
/// orphans, 0 missing), then asserts each of `survivors` holds its own.
/// Returns the sandboxes.
pub async fn assert_provider_and_records_agree(
    client: &Client,
    provider: &dyn Provider,
    deployment: &str,
    survivors: &[String],
    limit: Duration,
) -> Vec<SandboxInfo> {
    let (sandboxes, live) = eventually("provider and records agree", limit, || {
        provider_and_records_agree(client, provider, deployment)
    })
    .await;
    assert_eq!(
        sandboxes.len(),
        live.iter()
            .filter(|r| r.state() != RunState::Pending)
            .count()
    );
    for run_id in survivors {
        if !sandboxes
            .iter()
            .any(|s| s.labels.get(corral_provider::LABEL_RUN_ID) == Some(run_id))
        {
            let run = client.get(run_id).await;
            panic!("survivor {run_id} holds no sandbox; its record: {run:?}");
        }
    }
    sandboxes
}
