//! The tracker takes the end, start or finalize of an owned run only from
//! its owner or the reaper; anyone else is refused with `FORBIDDEN`, and
//! the run is untouched. Every refusal says why as a typed `Refusal`, so
//! no caller reads the message.

use corral_proto::v1::tracker_error::{Code, Refusal};
use corral_proto::v1::{RecordSandboxRequest, RunEvent, RunState, StopCommand, TransitionRequest};
use corral_tests::TestEnv;

fn request(run_id: &str, event: RunEvent, actor: &str, owner: &str) -> TransitionRequest {
    TransitionRequest {
        run_id: run_id.to_owned(),
        event: event as i32,
        reason: format!("{actor} tried"),
        actor: actor.to_owned(),
        owner: owner.to_owned(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_or_the_reaper_ends_an_owned_run() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let owned = |n: usize| {
        let env = &env;
        let client = &client;
        async move {
            let command = env.command(&["true"]);
            client.submit(&command).await.expect("submit");
            client.claim(&command, "spawner-a").await.expect("claim");
            client
                .record_sandbox(&RecordSandboxRequest {
                    run_id: command.run_id.clone(),
                    owner: "spawner-a".into(),
                    sandbox_id: format!("sandbox-{n}"),
                    provider: "local".into(),
                    ..Default::default()
                })
                .await
                .expect("record sandbox");
            command.run_id
        }
    };

    // Another spawner may not start, finalize or end it.
    let run_id = owned(1).await;
    for event in [RunEvent::Start, RunEvent::Fail, RunEvent::Stop] {
        let refused = client
            .transition(&request(&run_id, event, "spawner:spawner-b", "spawner-b"))
            .await
            .expect_err("not the owner");
        assert_eq!(refused.code(), Some(Code::Forbidden), "{refused}");
        assert_eq!(refused.refusal(), Refusal::NotOwner, "{refused}");
        assert!(
            refused.to_string().contains("owned by spawner-a"),
            "{refused}"
        );
    }
    // Nor may a caller that names no owner.
    let anonymous = client
        .transition(&request(&run_id, RunEvent::Fail, "someone", ""))
        .await
        .expect_err("no owner named");
    assert_eq!(anonymous.code(), Some(Code::Forbidden), "{anonymous}");
    assert_eq!(
        client.get(&run_id).await.expect("get").state(),
        RunState::Booting,
        "refusals change nothing"
    );
    // The owner may.
    client
        .transition(&request(
            &run_id,
            RunEvent::Start,
            "spawner:spawner-a",
            "spawner-a",
        ))
        .await
        .expect("the owner starts it");
    let finalizing = client
        .transition(&request(
            &run_id,
            RunEvent::BeginFinalize,
            "spawner:spawner-a",
            "spawner-a",
        ))
        .await
        .expect("the owner finalizes it");
    assert_eq!(finalizing.state(), RunState::Finalizing);
    let done = client
        .transition(&request(
            &run_id,
            RunEvent::Complete,
            "spawner:spawner-a",
            "spawner-a",
        ))
        .await
        .expect("the owner completes it");
    assert_eq!(done.state(), RunState::Completed);

    // The reaper may end a run it does not own (owner lost, deadline).
    let judged = owned(2).await;
    let failed = client
        .transition(&request(&judged, RunEvent::Fail, "reaper:r1", ""))
        .await
        .expect("the reaper ends it");
    assert_eq!(failed.state(), RunState::Failed);
    let history: Vec<(String,)> =
        sqlx::query_as("SELECT actor FROM run_transitions WHERE run_id = $1 ORDER BY id")
            .bind(&judged)
            .fetch_all(&env.pool().await)
            .await
            .expect("history");
    assert_eq!(
        history.last().map(|(actor,)| actor.as_str()),
        Some("reaper:r1"),
        "the actor is recorded"
    );

    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_as_a_code() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let command = env.command(&["true"]);
    client.submit(&command).await.expect("submit");
    let claimed = client.claim(&command, "spawner-a").await.expect("claim");
    let run_id = command.run_id.clone();
    let owner = |event: RunEvent| request(&run_id, event, "spawner:spawner-a", "spawner-a");

    // Start before the sandbox is recorded.
    let refused = client
        .transition(&owner(RunEvent::Start))
        .await
        .expect_err("no sandbox yet");
    assert_eq!(refused.refusal(), Refusal::NoSandbox, "{refused}");
    assert_eq!(refused.code(), Some(Code::Conflict));

    // Another spawner records a sandbox of a run it does not hold.
    let refused = client
        .record_sandbox(&RecordSandboxRequest {
            run_id: run_id.clone(),
            owner: "spawner-b".into(),
            sandbox_id: "sandbox-b".into(),
            provider: "local".into(),
            ..Default::default()
        })
        .await
        .expect_err("held by spawner-a");
    assert_eq!(refused.refusal(), Refusal::HeldByAnother, "{refused}");

    client
        .record_sandbox(&RecordSandboxRequest {
            run_id: run_id.clone(),
            owner: "spawner-a".into(),
            sandbox_id: "sandbox-a".into(),
            provider: "local".into(),
            ..Default::default()
        })
        .await
        .expect("record sandbox");
    let running = client
        .transition(&owner(RunEvent::Start))
        .await
        .expect("start");
    assert_eq!(running.state(), RunState::Running);

    // A version that is not the run's.
    let mut stale = owner(RunEvent::BeginFinalize);
    stale.expected_version = claimed.1.version;
    let refused = client.transition(&stale).await.expect_err("an old version");
    assert_eq!(refused.refusal(), Refusal::VersionMismatch, "{refused}");

    // A stop was requested: no finalize.
    client
        .stop(&StopCommand {
            run_id: run_id.clone(),
            reason: "test".into(),
            requested_by: "test".into(),
            requested_at_ms: corral_common::now_ms(),
        })
        .await
        .expect("stop");
    let before = client.get(&run_id).await.expect("get").version;
    let refused = client
        .transition(&owner(RunEvent::BeginFinalize))
        .await
        .expect_err("stop requested");
    assert_eq!(refused.refusal(), Refusal::StopRequested, "{refused}");
    assert_eq!(
        client.get(&run_id).await.expect("get").version,
        before,
        "refusals change nothing"
    );

    tracker.stop().await;
    env.cleanup().await;
}

/// An owner with no boot to wait for records its sandbox and starts the run
/// in one request, through the same fence as a start of its own: both
/// transitions are recorded and announced; a run whose stop was requested
/// meanwhile is recorded but stays booting, with no error, and the owner's
/// own start then learns why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_recorded_with_start_starts_the_run_unless_a_stop_came_first() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let record = |run_id: &str| RecordSandboxRequest {
        run_id: run_id.to_owned(),
        owner: "spawner-a".into(),
        sandbox_id: format!("sandbox-{run_id}"),
        provider: "local".into(),
        start: true,
        ..Default::default()
    };

    let command = env.command(&["true"]);
    client.submit(&command).await.expect("submit");
    client.claim(&command, "spawner-a").await.expect("claim");
    let run = client
        .record_sandbox(&record(&command.run_id))
        .await
        .expect("record and start");
    assert_eq!(run.state(), RunState::Running);
    assert_eq!(run.sandbox_id, format!("sandbox-{}", command.run_id));
    // The relay announces after the commit: wait for the three rows.
    let announced: Vec<RunState> = env
        .wait_lifecycle(&command.run_id, 3)
        .await
        .into_iter()
        .map(|event| event.to())
        .collect();
    assert_eq!(
        announced,
        [RunState::Pending, RunState::Booting, RunState::Running],
        "every transition announced, the start included"
    );

    let stopped = env.command(&["true"]);
    client.submit(&stopped).await.expect("submit");
    client.claim(&stopped, "spawner-a").await.expect("claim");
    let stop = StopCommand {
        run_id: stopped.run_id.clone(),
        reason: "changed my mind".into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    client.stop(&stop).await.expect("stop");
    let run = client
        .record_sandbox(&record(&stopped.run_id))
        .await
        .expect("the sandbox is recorded though the start is not applied");
    assert_eq!(run.state(), RunState::Booting, "not started after a stop");
    assert_eq!(run.sandbox_id, format!("sandbox-{}", stopped.run_id));
    let refused = client
        .transition(&request(
            &stopped.run_id,
            RunEvent::Start,
            "spawner:spawner-a",
            "spawner-a",
        ))
        .await
        .expect_err("the owner's own start learns why");
    assert_eq!(refused.refusal(), Refusal::StopRequested, "{refused}");

    tracker.stop().await;
    env.cleanup().await;
}
