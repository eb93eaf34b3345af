//! Every outcome is recorded however long PostgreSQL is away, and the
//! reaper judges no run on evidence from an outage or a large disruption.

use std::time::Duration;

use corral_proto::v1::{RecordSandboxRequest, RunEvent, RunState, TransitionRequest};
use corral_provider::{Labels, Provider};
use corral_tests::{PrivatePostgres, TestEnv, eventually};

const LIMIT: Duration = Duration::from_secs(90);

/// An agent that waits for `/shared/<name>`, then exits 3.
fn waits_then_exits_3(env: &TestEnv, name: &str) -> corral_proto::v1::RunCommand {
    env.command(&[
        "sh",
        "-c",
        &format!("while [ ! -f /shared/{name} ]; do sleep 0.1; done; exit 3"),
    ])
}

/// Waits until the owner has killed the sandbox (the run is over for it).
async fn sandbox_gone(env: &TestEnv, sandbox_id: &str) {
    let provider = env.local_provider();
    eventually("the owner killed the sandbox", LIMIT, || async {
        let listed = provider.list(&Labels::new()).await.ok()?;
        (!listed.iter().any(|s| s.id == sandbox_id)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_ends_while_postgres_is_away_for_20_s_records_its_true_outcome() {
    let env = TestEnv::new().await;
    let postgres = PrivatePostgres::start();
    let mut config = env.tracker_config();
    config.database_url = corral_common::Secret::new(postgres.url());
    let tracker = env.start_tracker_with(config).await;
    let spawner = env.start_spawner().await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let client = env.client().await;

    let command = waits_then_exits_3(&env, "end");
    client.start_run(&command).await.expect("submit");
    let running = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;

    // The database goes away; then the agent exits 3 and its owner kills
    // the sandbox, with nothing recordable.
    postgres.stop();
    std::fs::write(env.shared.join("end"), "").expect("release the agent");
    sandbox_gone(&env, &running.sandbox_id).await;
    // Longer than any bounded retry would last, and than the owner timeout.
    tokio::time::sleep(Duration::from_secs(20)).await;
    postgres.start_again();

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.exit_code),
        (RunState::Failed, Some(3)),
        "the agent's own outcome, not a judgment from the outage: {}",
        run.reason
    );
    assert!(!run.reason.contains("lost"), "{}", run.reason);

    reaper.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_tracker_cannot_take_before_exit_is_kept_on_disk_and_recorded_by_the_next_spawner()
 {
    let env = TestEnv::new().await;
    let postgres = PrivatePostgres::start();
    let mut config = env.tracker_config();
    config.database_url = corral_common::Secret::new(postgres.url());
    let tracker = env.start_tracker_with(config).await;
    let mut spawner_config = env.spawner_config();
    spawner_config.drain_timeout_ms = 100;
    let spawner = env.start_spawner_with(spawner_config).await;
    let client = env.client().await;

    let command = waits_then_exits_3(&env, "end");
    client.start_run(&command).await.expect("submit");
    let running = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;
    postgres.stop();
    std::fs::write(env.shared.join("end"), "").expect("release the agent");
    sandbox_gone(&env, &running.sandbox_id).await;

    // The spawner must go (a deploy) while the database is still away.
    spawner.stop().await;
    let kept = env
        .home
        .join("outcomes")
        .join(format!("{}.pb", command.run_id));
    assert!(kept.exists(), "the outcome is kept at {}", kept.display());

    postgres.start_again();
    let spawner = env.start_spawner().await;
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.exit_code),
        (RunState::Failed, Some(3)),
        "{}",
        run.reason
    );
    eventually(
        "the kept outcome is removed once recorded",
        LIMIT,
        || async { (!kept.exists()).then_some(()) },
    )
    .await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// Claims `command` as `owner` and makes it running with a sandbox id no
/// provider of this test holds (the reaper judges owners, not sandboxes).
async fn owned_running(client: &corral_client::Client, env: &TestEnv, owner: &str) -> String {
    let command = env.command(&["true"]);
    client.submit(&command).await.expect("submit");
    client.claim(&command, owner).await.expect("claim");
    client
        .record_sandbox(&RecordSandboxRequest {
            run_id: command.run_id.clone(),
            owner: owner.to_owned(),
            sandbox_id: format!("elsewhere-{owner}"),
            provider: "elsewhere".into(),
            ..Default::default()
        })
        .await
        .expect("record sandbox");
    client
        .transition(&TransitionRequest {
            run_id: command.run_id.clone(),
            event: RunEvent::Start as i32,
            actor: owner.to_owned(),
            owner: owner.to_owned(),
            ..Default::default()
        })
        .await
        .expect("start");
    command.run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_spawners_silent_at_once_get_the_disruption_grace_one_does_not() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let mut reaper_config = env.reaper_config();
    reaper_config.owner_timeout_ms = 1000;
    reaper_config.disruption_min_spawners = 3;
    reaper_config.disruption_fraction = 0.5;
    reaper_config.disruption_grace_ms = 10_000;

    // Three spawners (the test heartbeats for them), one run each.
    let owners = ["spawner-a", "spawner-b", "spawner-c"];
    let beating = std::sync::Arc::new(std::sync::Mutex::new(owners.to_vec()));
    let beats = {
        let client = env.client().await;
        let beating = beating.clone();
        tokio::spawn(async move {
            loop {
                let ids = beating.lock().expect("beating list").clone();
                for id in ids {
                    let _ = client.heartbeat(id, 1, None).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut runs = Vec::new();
    for owner in owners {
        runs.push(owned_running(&client, &env, owner).await);
    }
    let reaper = env.start_reaper_with(reaper_config).await;

    // One of three goes silent: an ordinary loss, judged at the owner timeout.
    beating
        .lock()
        .expect("beating list")
        .retain(|id| *id != "spawner-a");
    let a_silent = corral_common::now_ms();
    let a = eventually("spawner-a's run fails as owner_lost", LIMIT, || async {
        let run = client.get(&runs[0]).await.ok()?;
        run.state().is_terminal().then_some(run)
    })
    .await;
    assert_eq!(a.state(), RunState::Failed);
    assert!(a.reason.contains("owner"), "{}", a.reason);
    assert!(
        a.finished_at_ms - a_silent < 10_000,
        "an ordinary loss gets no disruption grace: {} ms",
        a.finished_at_ms - a_silent
    );

    // Then the other two at once: more than half of the three seen.
    beating.lock().expect("beating list").clear();
    let silent = corral_common::now_ms();
    for run_id in &runs[1..] {
        let run = eventually(
            "the run fails after the disruption grace",
            LIMIT,
            || async {
                let run = client.get(run_id).await.ok()?;
                run.state().is_terminal().then_some(run)
            },
        )
        .await;
        assert_eq!(run.state(), RunState::Failed);
        assert!(
            // Silent since its last beat, up to a beat period (and clock
            // skew between the test and the database) before `silent`.
            run.finished_at_ms - silent >= 9_000,
            "judged {} ms after its owner went silent, inside the disruption grace",
            run.finished_at_ms - silent
        );
    }

    beats.abort();
    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
