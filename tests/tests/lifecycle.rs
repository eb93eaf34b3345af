//! The lifecycle stream holds exactly the rows of `run_transitions`: once
//! each, in order per run, whatever dies between a commit and its
//! announcement (the transactional outbox and its relay).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use corral_proto::v1::RunState;
use corral_tests::{PrivateNats, TestEnv, eventually, tracker_answers};

const LIMIT: Duration = Duration::from_secs(90);

async fn history_len(env: &TestEnv, run_id: &str) -> usize {
    let pool = env.pool().await;
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM run_transitions WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(&pool)
        .await
        .expect("count transitions");
    pool.close().await;
    rows as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_killed_between_commit_and_announcement_loses_no_lifecycle_event() {
    let env = TestEnv::new().await;
    // A tracker process that dies (SIGKILL) right after its second commit,
    // before anything announced it.
    let mut doomed = env.spawn_service_process(
        "tracker",
        &[("CORRAL_FAULT_POINT", "tracker.after_commit:2")],
    );
    let client = env.client().await;
    tracker_answers(&client, "the doomed tracker answers").await;

    let first = env.command(&["true"]);
    client.submit(&first).await.expect("first submit");
    // Announced: the relay is idle when the second commit comes.
    env.wait_lifecycle(&first.run_id, 1).await;
    let second = env.command(&["true"]);
    let answered = client.submit(&second).await;
    assert!(
        answered.is_err(),
        "the tracker died before it answered: {answered:?}"
    );
    let status = tokio::time::timeout(LIMIT, doomed.wait())
        .await
        .expect("the doomed tracker exits")
        .expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");

    // The fault was where it was meant to be: committed, not announced.
    let pool = env.pool().await;
    let relayed: Vec<(bool,)> =
        sqlx::query_as("SELECT relayed FROM run_transitions WHERE run_id = $1")
            .bind(&second.run_id)
            .fetch_all(&pool)
            .await
            .expect("the second run's history");
    pool.close().await;
    assert_eq!(relayed, [(false,)], "the submit is committed, unrelayed");
    assert!(env.lifecycle(&second.run_id).await.is_empty());

    // Another tracker announces it, once; the first run's stays once.
    let tracker = env.start_tracker().await;
    env.wait_lifecycle(&second.run_id, 1).await;
    env.wait_lifecycle(&first.run_id, 1).await;

    // Both runs go on to their end, each step announced once, in order.
    let spawner = env.start_spawner().await;
    client.publish_run(&first).await.expect("publish first");
    client.publish_run(&second).await.expect("publish second");
    for command in [&first, &second] {
        let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
        assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
        let events = env.wait_lifecycle(&command.run_id, 4).await;
        assert_eq!(events[3].to(), RunState::Completed);
    }

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_flow_loses_and_repeats_no_lifecycle_event() {
    let mut nats = PrivateNats::start();
    let env = TestEnv::with_nats(&nats.url()).await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let mut commands = Vec::new();
    for _ in 0..12 {
        let command = env.command(&["sh", "-c", "sleep 0.5"]);
        client.start_run(&command).await.expect("submit");
        commands.push(command);
    }
    // Mid-flow: some runs are running when NATS goes away for 3 s.
    eventually("some runs are running", LIMIT, || async {
        let mut running = 0;
        for command in &commands {
            if client
                .get(&command.run_id)
                .await
                .is_ok_and(|r| r.state() == RunState::Running)
            {
                running += 1;
            }
        }
        (running >= 2).then_some(())
    })
    .await;
    nats.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    nats.start_again();

    // More runs after the restart.
    for _ in 0..6 {
        let command = env.command(&["true"]);
        let submitted = eventually("a submit after the restart", LIMIT, || async {
            client.start_run(&command).await.ok()
        })
        .await;
        assert_eq!(submitted.run_id, command.run_id);
        commands.push(command);
    }
    let mut transitions = 0;
    for command in &commands {
        let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
        assert!(run.state().is_terminal());
        let rows = history_len(&env, &command.run_id).await;
        assert!(rows >= 2, "submitted and ended: {rows} rows");
        env.wait_lifecycle(&command.run_id, rows).await;
        transitions += rows;
    }
    assert!(transitions >= commands.len() * 2);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
