//! Kept sessions: turns in one sandbox, session ids, pause and resume (by
//! hand and by the reaper), a gone sandbox replaced once, stops between
//! turns, and cost matching the recorded intervals. Real processes, real
//! NATS and PostgreSQL.

use std::time::Duration;

use corral_client::Client;
use corral_proto::v1::{AgentEvent, CostRequest, RunState, agent_event, session_command};
use corral_provider::local::{is_alive, is_paused};
use corral_provider::{LABEL_RUN_ID, Labels, Provider};
use corral_tests::sessions::{continue_run, idle_after, released, session, stop_run};
use corral_tests::{TestEnv, eventually};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(30);

/// The background process the agent wrote to `bg.pid`, as a pid on this
/// machine (the agent saw its sandbox's own pid numbers).
fn read_pid(env: &TestEnv, sandbox_id: &str) -> i32 {
    let provider = env.local_provider();
    let path = provider.work_dir(sandbox_id).join("bg.pid");
    let inner: i32 = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .trim()
        .parse()
        .expect("a pid");
    provider
        .host_pid(sandbox_id, inner)
        .unwrap_or_else(|| panic!("background process {inner} of {sandbox_id} is not running"))
}

/// Alive and not paused (a dead process is not "running" either).
fn running(pid: i32) -> bool {
    is_alive(pid) && !is_paused(pid)
}

/// Stops a kept run between turns: it ends `stopped` with the stop's
/// reason, and its background process `pid` (even a frozen one) is gone.
async fn stop_and_check(env: &TestEnv, client: &Client, run_id: &str, pid: i32) {
    stop_run(client, run_id, "user left").await;
    let ended = env.wait_terminal(client, run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped);
    assert_eq!(ended.reason, "user left");
    eventually("the background process is gone", LIMIT, || async {
        (!is_alive(pid)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continued_turn_runs_in_the_same_sandbox_with_the_session_id() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // Turn 1 writes a file, reports a session id (as an agent does, on its
    // events subject), and waits for the test's go-ahead to exit.
    let command = env.kept(&[
        "sh",
        "-c",
        "echo one > notes.txt; echo ready; while [ ! -f go ]; do sleep 0.02; done",
    ]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let running = env.wait_state(&client, &run_id, RunState::Running).await;
    eventually("turn 1 is ready", LIMIT, || async {
        env.output(&run_id)
            .await
            .contains(&"ready".to_owned())
            .then_some(())
    })
    .await;
    let started = AgentEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        run_id: run_id.clone(),
        kind: "agent.started".into(),
        at_ms: corral_common::now_ms(),
        payload: Some(agent_event::Payload::Started(corral_proto::v1::Started {
            session_id: "sess-1".into(),
            model: "test".into(),
        })),
        ..Default::default()
    };
    client
        .jetstream()
        .publish(
            env.subjects.events(&run_id, "agent.started"),
            started.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    let provider = env.local_provider();
    std::fs::write(provider.work_dir(&running.sandbox_id).join("go"), b"").expect("go");

    let idle = idle_after(&client, &run_id, 1).await;
    assert_eq!(idle.session_id, "sess-1", "the session id is recorded");
    assert_eq!(idle.exit_code, Some(0));
    assert!(
        provider
            .work_dir(&idle.sandbox_id)
            .join("notes.txt")
            .exists(),
        "the sandbox outlives the turn"
    );

    continue_run(
        &client,
        &run_id,
        &[
            "sh",
            "-c",
            "echo \"session=$CORRAL_SESSION_ID turn=$CORRAL_TURN\"; cat notes.txt",
        ],
    )
    .await;
    let second = idle_after(&client, &run_id, 2).await;
    assert_eq!(second.sandbox_id, running.sandbox_id, "same sandbox");
    assert_eq!(second.sandbox_epoch, 1, "never replaced");
    let lines = env.output(&run_id).await;
    assert!(
        lines.contains(&"session=sess-1 turn=2".to_owned()) && lines.contains(&"one".to_owned()),
        "turn 2 saw the session id and turn 1's file: {lines:?}"
    );

    // A continue while a turn runs is refused, not queued behind it.
    continue_run(&client, &run_id, &["sh", "-c", "sleep 300"]).await;
    env.wait_state(&client, &run_id, RunState::Running).await;
    continue_run(&client, &run_id, &["true"]).await;
    let dlq = eventually("the second continue is dead-lettered", LIMIT, || async {
        let messages = env
            .stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("cmd"))
            .await;
        messages.into_iter().find_map(|m| {
            let error = m.headers.get(corral_proto::headers::DLQ_ERROR)?.to_string();
            error.contains(&run_id).then_some(error)
        })
    })
    .await;
    assert!(dlq.contains("idle or paused"), "{dlq}");

    // A stop ends the running turn, and the run: a stopped run has no sandbox.
    stop_run(&client, &run_id, "done").await;
    let ended = env.wait_terminal(&client, &run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped);
    assert!(!provider.work_dir(&running.sandbox_id).exists());

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_the_sandbox_and_continue_resumes_it() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // A background process that outlives the turn, as a dev server would.
    let command = env.kept(&["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $! > bg.pid"]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let idle = idle_after(&client, &run_id, 1).await;
    let pid = read_pid(&env, &idle.sandbox_id);
    assert!(running(pid), "the background process lives on");

    session(&client, &run_id, session_command::Action::Pause).await;
    let paused = released(&client, &run_id, RunState::Paused).await;
    assert!(paused.paused_at_ms > 0);
    assert!(is_paused(pid), "paused means frozen");

    continue_run(&client, &run_id, &["sh", "-c", "echo thawed"]).await;
    let after = idle_after(&client, &run_id, 2).await;
    assert_eq!(
        after.sandbox_id, idle.sandbox_id,
        "the same sandbox, resumed"
    );
    assert!(running(pid), "continue resumed the sandbox");
    assert!(env.output(&run_id).await.contains(&"thawed".to_owned()));

    // Pause and resume by hand, without a turn.
    session(&client, &run_id, session_command::Action::Pause).await;
    released(&client, &run_id, RunState::Paused).await;
    session(&client, &run_id, session_command::Action::Resume).await;
    let resumed = idle_after(&client, &run_id, 2).await;
    assert!(running(pid), "resume thaws it");

    // A stop between turns kills the sandbox (nobody owns an idle run).
    let provider = env.local_provider();
    stop_and_check(&env, &client, &run_id, pid).await;
    assert!(!provider.work_dir(&resumed.sandbox_id).exists());

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_pauses_a_run_idle_past_its_window() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let client = env.client().await;

    let mut command = env.kept(&["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $! > bg.pid"]);
    command.spec.as_mut().expect("spec").idle_pause_secs = 1;
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let idle = idle_after(&client, &run_id, 1).await;
    let pid = read_pid(&env, &idle.sandbox_id);
    let paused = released(&client, &run_id, RunState::Paused).await;
    let idle_for = paused.paused_at_ms - paused.idle_at_ms;
    assert!(
        idle_for >= 1000,
        "paused after its window, not before: {idle_for} ms"
    );
    assert!(is_paused(pid), "paused means frozen");
    stop_and_check(&env, &client, &run_id, pid).await;

    reaper.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_killed_behind_corrals_back_is_replaced_once_and_the_session_cleared() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let command = env.kept(&["sh", "-c", "echo one > notes.txt"]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let idle = idle_after(&client, &run_id, 1).await;
    // Give it a session id to lose.
    let pool = env.pool().await;
    sqlx::query("UPDATE runs SET session_id = 'sess-old' WHERE run_id = $1")
        .bind(&run_id)
        .execute(&pool)
        .await
        .expect("session id");

    // Another process on this machine kills the sandbox: the record still
    // names it, the provider no longer has it.
    let other = env.local_provider();
    other.kill(&idle.sandbox_id).await.expect("kill");
    // The reaper does not fail a kept run between turns for it: the next
    // continue replaces the sandbox.
    let reaper = corral_reaper::sweep::Reaper::new(
        client.clone(),
        std::sync::Arc::new(other.clone()),
        &env.reaper_config(),
        "test",
    );
    let report = reaper.sweep().await.expect("sweep");
    assert_eq!(report.sandboxes_lost, 0, "{report:?}");
    assert_eq!(
        client.get(&run_id).await.expect("get").state(),
        RunState::Idle
    );

    continue_run(
        &client,
        &run_id,
        &[
            "sh",
            "-c",
            "test -f notes.txt && echo kept || echo fresh; echo \"session=[$CORRAL_SESSION_ID]\"",
        ],
    )
    .await;
    let after = idle_after(&client, &run_id, 2).await;
    assert_ne!(after.sandbox_id, idle.sandbox_id, "a new sandbox");
    assert_eq!(after.sandbox_epoch, 2);
    assert_eq!(after.session_id, "", "the session id is cleared");
    assert!(
        after.reason.contains("sandbox replaced"),
        "the run says why: {}",
        after.reason
    );
    let lines = env.output(&run_id).await;
    assert!(
        lines.contains(&"fresh".to_owned()) && lines.contains(&"session=[]".to_owned()),
        "{lines:?}"
    );
    let (replacements,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM run_transitions WHERE run_id = $1 AND event = 'replace_sandbox'",
    )
    .bind(&run_id)
    .fetch_one(&pool)
    .await
    .expect("history");
    assert_eq!(replacements, 1, "exactly one replacement");
    let mut labels = Labels::new();
    labels.insert(LABEL_RUN_ID.into(), run_id.clone());
    let sandboxes = other.list(&labels).await.expect("list");
    assert_eq!(sandboxes.len(), 1, "one sandbox for the run: {sandboxes:?}");
    pool.close().await;
    stop_run(&client, &run_id, "done").await;
    env.wait_terminal(&client, &run_id, LIMIT).await;
    assert!(other.list(&labels).await.expect("list").is_empty());

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_matches_the_recorded_intervals() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // A real session through every billed state: booting, running, idle,
    // paused, running, idle, then stopped.
    let mut command = env.kept(&["true"]);
    let spec = command.spec.as_mut().expect("spec");
    spec.labels.insert("team".into(), "cost-test".into());
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    idle_after(&client, &run_id, 1).await;
    session(&client, &run_id, session_command::Action::Pause).await;
    released(&client, &run_id, RunState::Paused).await;
    continue_run(&client, &run_id, &["true"]).await;
    idle_after(&client, &run_id, 2).await;
    let live = client.get(&run_id).await.expect("get");
    assert!(live.cost_usd > 0.0, "an idle run accrues cost");
    stop_run(&client, &run_id, "done").await;
    env.wait_terminal(&client, &run_id, LIMIT).await;

    // Script the history: rewrite each transition's time to a known offset,
    // so the expected figure is exact. Offsets in seconds from a base:
    // pending 0, booting 60, running 70, idle 3670 (running 1 h), paused
    // 5470 (idle 30 min), running 12670 (paused 2 h), idle 12700, stopped
    // 12730.
    let pool = env.pool().await;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, to_state FROM run_transitions WHERE run_id = $1 ORDER BY id")
            .bind(&run_id)
            .fetch_all(&pool)
            .await
            .expect("history");
    let states: Vec<&str> = rows.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        states,
        [
            "pending", "booting", "running", "idle", "paused", "running", "idle", "stopped"
        ],
        "the recorded history"
    );
    let offsets = [0, 60, 70, 3670, 5470, 12670, 12700, 12730];
    for ((id, _), offset) in rows.iter().zip(offsets) {
        sqlx::query(
            "UPDATE run_transitions SET at = '2026-01-01T00:00:00Z'::timestamptz + make_interval(secs => $2)
             WHERE id = $1",
        )
        .bind(id)
        .bind(offset as f64)
        .execute(&pool)
        .await
        .expect("rewrite");
    }
    // Billed at the running rate: booting 10 s + running 3600 s + idle
    // 1800 s + running 30 s + idle 30 s = 5470 s; paused 7200 s. Default
    // local prices: $0.05/h running, $0.005/h paused.
    let running_ms = 5_470_000;
    let paused_ms = 7_200_000;
    let expected = 0.05 * 5470.0 / 3600.0 + 0.005 * 7200.0 / 3600.0;
    let run = client.get(&run_id).await.expect("get");
    assert_eq!(
        (run.billed_running_ms, run.billed_paused_ms),
        (running_ms, paused_ms)
    );
    assert!(
        (run.cost_usd - expected).abs() < 1e-12,
        "cost {} != expected {expected}",
        run.cost_usd
    );
    let listed = client
        .list(&corral_proto::v1::ListRunsRequest {
            labels: [("team".to_owned(), "cost-test".to_owned())].into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].cost_usd, run.cost_usd, "ls shows the same cost");

    // `corral cost` by label and period: the whole day, then only the
    // paused stretch's second hour (01:31:10 .. 02:31:10 → 3600 s paused).
    let mut labels = std::collections::HashMap::new();
    labels.insert("team".to_owned(), "cost-test".to_owned());
    let day = client
        .cost(&CostRequest {
            labels: labels.clone(),
            since_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            until_ms: 1_767_225_600_000 + 86_400_000, // a day later
            group_by: "team".into(),
        })
        .await
        .expect("cost");
    let total = day.total.expect("total");
    assert_eq!(
        (total.runs, total.running_ms, total.paused_ms),
        (1, running_ms, paused_ms)
    );
    assert!(
        (total.cost_usd - expected).abs() < 1e-12,
        "{}",
        total.cost_usd
    );
    assert_eq!(day.lines.len(), 1);
    assert_eq!(day.lines[0].key, "cost-test");
    let hour = client
        .cost(&CostRequest {
            labels,
            since_ms: 1_767_225_600_000 + 9_070_000,
            until_ms: 1_767_225_600_000 + 12_670_000,
            group_by: String::new(),
        })
        .await
        .expect("cost");
    let total = hour.total.expect("total");
    assert_eq!((total.running_ms, total.paused_ms), (0, 3_600_000));
    assert!((total.cost_usd - 0.005).abs() < 1e-12, "{}", total.cost_usd);
    assert_eq!(hour.lines[0].key, "local/default");
    pool.close().await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawner_shutting_down_interrupts_the_turn_and_keeps_the_session() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.spawner_config();
    config.drain_timeout_ms = 100;
    let spawner = env.start_spawner_with(config).await;
    let client = env.client().await;

    let command = env.kept(&["sh", "-c", "echo one > notes.txt; sleep 300"]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let running = env.wait_state(&client, &run_id, RunState::Running).await;
    let provider = env.local_provider();
    let notes = provider.work_dir(&running.sandbox_id).join("notes.txt");
    eventually("turn 1 wrote its notes", LIMIT, || async {
        notes.exists().then_some(())
    })
    .await;

    // A deploy: the spawner goes away in the middle of the turn.
    spawner.stop().await;
    let idle = idle_after(&client, &run_id, 1).await;
    assert!(idle.reason.contains("interrupted"), "{}", idle.reason);
    assert!(notes.exists(), "the sandbox survives the spawner");

    let spawner = env.start_spawner().await;
    continue_run(&client, &run_id, &["cat", "notes.txt"]).await;
    let after = idle_after(&client, &run_id, 2).await;
    assert_eq!(
        (after.sandbox_id.as_str(), after.exit_code),
        (running.sandbox_id.as_str(), Some(0))
    );
    stop_run(&client, &run_id, "done").await;
    env.wait_terminal(&client, &run_id, LIMIT).await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_killed_outright_fails_the_turn_not_the_session() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // SIGKILL with nobody having asked (as a CPU limit does).
    let command = env.kept(&["sh", "-c", "echo one > notes.txt; kill -9 $$"]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let idle = idle_after(&client, &run_id, 1).await;
    assert_eq!(idle.exit_code, Some(137));
    assert!(idle.reason.contains("signal 9"), "{}", idle.reason);

    continue_run(&client, &run_id, &["cat", "notes.txt"]).await;
    let after = idle_after(&client, &run_id, 2).await;
    assert_eq!(
        (after.sandbox_id.as_str(), after.exit_code),
        (idle.sandbox_id.as_str(), Some(0))
    );
    stop_run(&client, &run_id, "done").await;
    env.wait_terminal(&client, &run_id, LIMIT).await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
