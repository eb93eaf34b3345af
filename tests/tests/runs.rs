//! Runs end to end: real NATS with JetStream, real PostgreSQL, real processes.

use std::time::Duration;

use corral_proto::v1::{AgentEvent, ListRunsRequest, RunCommand, RunState, agent_event};
use corral_provider::{LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, LocalProvider, Provider};
use corral_tests::{SHARED_IN_SANDBOX, TestEnv, eventually, tracker_answers};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_prints_and_exits_zero_completes_with_its_output_events() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let command = env.command(&[
        "sh",
        "-c",
        "echo hello; echo to-stderr >&2; echo \"run=$CORRAL_RUN_ID\"",
    ]);
    client.start_run(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;

    assert_eq!(run.state(), RunState::Completed, "reason: {}", run.reason);
    assert_eq!(run.exit_code, Some(0));
    assert!(
        !run.sandbox_id.is_empty(),
        "the sandbox id should be recorded"
    );
    assert!(!run.owner.is_empty());
    assert!(run.running_at_ms >= run.booting_at_ms && run.finished_at_ms >= run.running_at_ms);

    let subject = env.subjects.events(&command.run_id, "agent.output");
    let messages = env
        .stream_messages(&env.subjects.events_stream(), &subject)
        .await;
    let lines: Vec<String> = messages
        .iter()
        .filter_map(
            |m| match AgentEvent::decode(m.payload.clone()).ok()?.payload? {
                agent_event::Payload::Output(output) => Some(output.line),
                _ => None,
            },
        )
        .collect();
    assert!(lines.contains(&"hello".to_owned()), "{lines:?}");
    assert!(lines.contains(&"to-stderr".to_owned()), "{lines:?}");
    assert!(
        lines.contains(&format!("run={}", command.run_id)),
        "{lines:?}"
    );

    // Every transition was announced on the lifecycle subject, once, in order.
    let lifecycle = env.wait_lifecycle(&command.run_id, 4).await;
    let steps: Vec<(RunState, RunState)> = lifecycle.iter().map(|e| (e.from(), e.to())).collect();
    assert_eq!(
        steps,
        [
            (RunState::Unspecified, RunState::Pending),
            (RunState::Pending, RunState::Booting),
            (RunState::Booting, RunState::Running),
            (RunState::Running, RunState::Completed),
        ]
    );
    assert!(
        lifecycle.windows(2).all(|w| w[0].version < w[1].version),
        "versions increase: {lifecycle:?}"
    );
    assert_eq!(lifecycle[3].exit_code, Some(0));
    assert_eq!(lifecycle[3].sandbox_id, run.sandbox_id);

    // The sandbox is gone once the run is terminal.
    let provider = env.local_provider();
    assert!(
        provider
            .list(&Labels::new())
            .await
            .expect("list")
            .is_empty()
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_exits_three_fails_with_exit_code_three() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let command = env.command(&["sh", "-c", "exit 3"]);
    client.start_run(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(run.exit_code, Some(3));
    assert_eq!(run.reason, "exit code 3");

    let missing = env.command(&["/no/such/agent"]);
    client.start_run(&missing).await.expect("submit");
    let run = env.wait_terminal(&client, &missing.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Failed);
    assert!(run.reason.contains("/no/such/agent"), "{}", run.reason);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_id_published_twice_creates_one_run_and_one_sandbox() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let marker = env.shared.join("executions");
    let script = format!("echo $CORRAL_SANDBOX_ID >> {SHARED_IN_SANDBOX}/executions; sleep 0.3");
    let command = env.command(&["sh", "-c", &script]);

    // Twice through the client (submit + publish) and twice as a bare publish,
    // before any spawner runs, so all four are queued together.
    client.start_run(&command).await.expect("first submit");
    client.start_run(&command).await.expect("second submit");
    client.publish_run(&command).await.expect("bare publish");
    let mut renamed_msg_id = command.clone();
    renamed_msg_id.submitted_at_ms += 1;
    client
        .publish_run(&renamed_msg_id)
        .await
        .expect("bare publish");
    let spawner = env.start_spawner().await;

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let executions = std::fs::read_to_string(&marker).expect("the agent ran");
    assert_eq!(
        executions.lines().count(),
        1,
        "one execution expected: {executions:?}"
    );
    assert_eq!(executions.trim(), run.sandbox_id);

    let pool = env.pool().await;
    let (runs,): (i64,) = sqlx::query_as("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await
        .expect("count");
    let (claims,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM run_transitions WHERE event = 'claim'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!((runs, claims), (1, 1));
    pool.close().await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_commands_are_dead_lettered_while_a_good_one_behind_them_completes() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;
    let js = client.jetstream();

    js.publish(
        env.subjects.cmd_run(),
        "this is not protobuf \u{1}\u{2}\u{3}".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let empty_argv = RunCommand {
        run_id: "empty-argv".into(),
        spec: Some(Default::default()),
        ..Default::default()
    };
    js.publish(env.subjects.cmd_run(), empty_argv.encode_to_vec().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let mut negative = env.command(&["true"]);
    negative.spec.as_mut().expect("spec").timeout_secs = -1;
    js.publish(env.subjects.cmd_run(), negative.encode_to_vec().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let mut unknown_provider = env.command(&["true"]);
    unknown_provider.spec.as_mut().expect("spec").provider = "nowhere".into();
    js.publish(
        env.subjects.cmd_run(),
        unknown_provider.encode_to_vec().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let good = env.command(&["true"]);
    client.start_run(&good).await.expect("submit");

    let run = env.wait_terminal(&client, &good.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed);

    let dead = eventually("four dead letters", LIMIT, || async {
        let dead = env.stream_messages(&env.subjects.dlq_stream(), "").await;
        (dead.len() >= 4).then_some(dead)
    })
    .await;
    let errors: Vec<String> = dead
        .iter()
        .map(|m| {
            m.headers
                .get(corral_proto::headers::DLQ_ERROR)
                .map(|v| v.to_string())
                .unwrap_or_default()
        })
        .collect();
    let expect = [
        "did not decode as RunCommand",
        "spec.argv is empty",
        "spec.timeout_secs is -1",
        "spec.provider \"nowhere\" is unknown",
    ];
    for needle in expect {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "no dead letter says {needle:?}: {errors:?}"
        );
    }
    assert_eq!(dead.len(), 4, "{errors:?}");
    for message in &dead {
        assert_eq!(
            message
                .headers
                .get(corral_proto::headers::DLQ_ORIGINAL_SUBJECT)
                .map(|v| v.to_string()),
            Some(env.subjects.cmd_run())
        );
    }
    // Nothing is left on the work queue: terminated, not pending redelivery.
    eventually("the command stream is empty", LIMIT, || async {
        let mut stream = js.get_stream(env.subjects.cmd_stream()).await.ok()?;
        (stream.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spawner_processes_share_a_burst_of_fifty_runs_each_run_executed_once() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let first = env
        .spawn_spawner_process(&[("CORRAL_MAX_RUNS", "10")])
        .await;
    let second = env
        .spawn_spawner_process(&[("CORRAL_MAX_RUNS", "10")])
        .await;
    let client = env.client().await;
    let ledger = env.shared.join("ledger");

    let mut ids = Vec::new();
    for _ in 0..50 {
        let script = format!("echo $CORRAL_RUN_ID >> {SHARED_IN_SANDBOX}/ledger; sleep 0.1");
        let command = env.command(&["sh", "-c", &script]);
        client.start_run(&command).await.expect("submit");
        ids.push(command.run_id);
    }
    let mut owners = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let run = env.wait_terminal(&client, id, LIMIT).await;
        assert_eq!(run.state(), RunState::Completed, "{id}: {}", run.reason);
        *owners.entry(run.owner).or_default() += 1;
    }
    let ledger = std::fs::read_to_string(&ledger).expect("ledger");
    let mut executed: Vec<&str> = ledger.lines().collect();
    executed.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(executed, expected, "each run executed exactly once");
    assert_eq!(
        owners.len(),
        2,
        "both spawners should have owned runs: {owners:?}"
    );
    assert!(owners.contains_key(&first.spawner_id) && owners.contains_key(&second.spawner_id));

    first.stop().await;
    second.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawner_restarted_after_sigkill_runs_again_and_what_the_killed_one_left_is_ended() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut spawner = env.spawn_spawner_process(&[]).await;
    let client = env.client().await;

    let command = env.command(&["sh", "-c", "sleep 300 & sleep 300"]);
    client.start_run(&command).await.expect("submit");
    let run = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;
    eventually("both agent processes run", LIMIT, || async {
        (LocalProvider::live_processes(&run.sandbox_id).len() >= 2).then_some(())
    })
    .await;

    spawner.kill_hard().await;
    assert!(
        LocalProvider::live_processes(&run.sandbox_id).len() >= 2,
        "the agent outlives its spawner: that is what must be found"
    );
    // What the killed one left is on disk, labelled with its run.
    let mut labels = Labels::new();
    labels.insert(LABEL_DEPLOYMENT.into(), env.prefix.clone());
    let left = env.local_provider().list(&labels).await.expect("list");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].labels.get(LABEL_RUN_ID), Some(&command.run_id));

    // A spawner restarted on the same home, and the reaper beside it.
    let restarted = env.spawn_spawner_process(&[]).await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let ended = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (ended.state(), ended.reason.as_str()),
        (RunState::Failed, "owner_lost")
    );
    eventually(
        "no process of the killed spawner's run survives",
        LIMIT,
        || async {
            LocalProvider::live_processes(&run.sandbox_id)
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // The restarted spawner runs new work in the same home.
    let next = env.command(&["true"]);
    client.start_run(&next).await.expect("submit");
    let done = env.wait_terminal(&client, &next.run_id, LIMIT).await;
    assert_eq!(done.state(), RunState::Completed, "{}", done.reason);
    assert_eq!(done.owner, restarted.spawner_id);

    reaper.stop().await;
    restarted.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_answers_a_malformed_request_or_an_unknown_op_with_an_error_that_says_so() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    for (op, expected) in [
        ("get", "did not decode as GetRunRequest"),
        ("nonsense", "unknown tracker op"),
    ] {
        let reply = client
            .nats()
            .request(env.subjects.tracker(op), "\u{1}\u{2}garbage".into())
            .await
            .expect("the tracker answers");
        let reply = corral_proto::v1::RunReply::decode(reply.payload).expect("a RunReply");
        let error = reply.error.expect("an error");
        assert_eq!(
            error.code,
            corral_proto::v1::tracker_error::Code::Invalid as i32
        );
        assert!(error.message.contains(expected), "{}", error.message);
    }
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_published_while_the_tracker_is_down_all_run_once_it_is_back() {
    let env = TestEnv::new().await;
    let mut tracker = env.spawn_service_process("tracker", &[]);
    let client = env.client().await;
    tracker_answers(&client, "the tracker answers").await;
    let spawner = env.start_spawner().await;

    // The tracker dies (SIGKILL) and stays away longer than the spawner's
    // claim retries used to last (about 4 s); commands keep coming.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(tracker.id().expect("pid") as i32, libc::SIGKILL) };
    let _ = tracker.wait().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let command = env.command(&["true"]);
        client.publish_run(&command).await.expect("publish");
        ids.push(command.run_id);
    }
    // Down for 8 s, measured from the last publish.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let tracker = env.spawn_service_process("tracker", &[]);
    tracker_answers(&client, "the tracker answers").await;

    for id in &ids {
        // No record until a spawner claims it (the tracker was away when
        // it was published).
        eventually(&format!("run {id} is claimed"), LIMIT, || async {
            client.get(id).await.ok()
        })
        .await;
        let run = env.wait_terminal(&client, id, LIMIT).await;
        assert_eq!(run.state(), RunState::Completed, "{id}: {}", run.reason);
    }
    let dead = env
        .stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("cmd"))
        .await;
    assert!(dead.is_empty(), "{} commands dead-lettered", dead.len());

    spawner.stop().await;
    drop(tracker);
    env.cleanup().await;
}

/// `list`: newest first, filtered by state, paged by `before_run_id`
/// without a run lost or repeated across pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_newest_first_and_filters_by_state() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;
    let mut completed = Vec::new();
    for _ in 0..3 {
        let command = env.command(&["true"]);
        client.start_run(&command).await.expect("submit");
        let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
        assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
        completed.push(command.run_id);
    }
    spawner.stop().await;
    let mut pending = Vec::new();
    for _ in 0..3 {
        let command = env.command(&["true"]);
        client.submit(&command).await.expect("submit");
        pending.push(command.run_id);
    }
    let newest_first = |ids: &[String]| ids.iter().rev().cloned().collect::<Vec<_>>();
    let ids =
        |runs: Vec<corral_proto::v1::Run>| runs.into_iter().map(|r| r.run_id).collect::<Vec<_>>();

    // Every run, four a page.
    let mut seen = Vec::new();
    let mut before = String::new();
    for page in 0.. {
        assert!(page < corral_tests::MAX_PAGES, "the pages never end");
        let runs = client
            .list(&ListRunsRequest {
                limit: 4,
                before_run_id: before.clone(),
                ..Default::default()
            })
            .await
            .expect("list");
        if runs.is_empty() {
            break;
        }
        assert!(runs.len() <= 4, "a page larger than its limit");
        before = runs.last().expect("a run").run_id.clone();
        seen.extend(ids(runs));
    }
    let mut all = completed.clone();
    all.extend(pending.clone());
    assert_eq!(seen, newest_first(&all));

    // One state, two a page.
    let pending_state = [RunState::Pending as i32].to_vec();
    let first = client
        .list(&ListRunsRequest {
            states: pending_state.clone(),
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("list");
    let last = first.last().expect("a run").run_id.clone();
    let second = client
        .list(&ListRunsRequest {
            states: pending_state,
            limit: 2,
            before_run_id: last,
            ..Default::default()
        })
        .await
        .expect("list");
    let mut listed = ids(first);
    listed.extend(ids(second));
    assert_eq!(listed, newest_first(&pending));
    let done = client
        .list(&ListRunsRequest {
            states: vec![RunState::Completed as i32],
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(ids(done), newest_first(&completed));

    tracker.stop().await;
    env.cleanup().await;
}

/// A run naming a provider this spawner does not have is dead-lettered
/// with a reason that names it, and the queue goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_naming_another_provider_is_dead_lettered_saying_which() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let mut elsewhere = env.command(&["true"]);
    elsewhere.spec.as_mut().expect("spec").provider = "e2b".into();
    client.start_run(&elsewhere).await.expect("submit");
    let good = env.command(&["true"]);
    client.start_run(&good).await.expect("submit");
    let run = env.wait_terminal(&client, &good.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "the queue goes on");

    let dead = eventually("the command dead-lettered", LIMIT, || async {
        let dead = env
            .stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("cmd"))
            .await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    let error = dead[0]
        .headers
        .get(corral_proto::headers::DLQ_ERROR)
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("\"e2b\"") && error.contains("not configured"),
        "{error}"
    );
    let command = RunCommand::decode(dead[0].payload.clone()).expect("the command, whole");
    assert_eq!(command.run_id, elsewhere.run_id);
    let pending = client.get(&elsewhere.run_id).await.expect("get");
    assert!(
        !pending.state().is_terminal(),
        "not run here: {:?}",
        pending.state()
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
