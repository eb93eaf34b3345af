//! The remote providers end to end: corral's services against the local
//! emulators of the E2B and Daytona APIs (real HTTP, real processes behind
//! them), with the faults those services really show.

use std::sync::Arc;
use std::time::Duration;

use corral_emulator::{DaytonaEmulator, E2bEmulator};
use corral_proto::v1::{RunCommand, RunState, session_command};
use corral_provider::{DaytonaConfig, E2bConfig, E2bProvider, LABEL_RUN_ID, Labels, Provider};
use corral_tests::sessions::{
    continue_run, idle_after, provider_and_records_agree, released, session, stop_run,
};
use corral_tests::{TestEnv, eventually, tracker_answers};

const LIMIT: Duration = Duration::from_secs(60);

fn e2b_config(emulator: &E2bEmulator) -> E2bConfig {
    E2bConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        envd_url: emulator.envd_url(),
        ..Default::default()
    }
}

/// This test's spawner configuration with the E2B provider on the emulator.
fn e2b_spawner(env: &TestEnv, emulator: &E2bEmulator) -> corral_spawner::Config {
    let mut config = env.spawner_config();
    config.provider = "e2b".into();
    config.e2b = e2b_config(emulator);
    config
}

/// This test's spawner configuration with the Daytona provider on the
/// emulator.
fn daytona_spawner(env: &TestEnv, emulator: &DaytonaEmulator) -> corral_spawner::Config {
    let mut config = env.spawner_config();
    config.provider = "daytona".into();
    config.daytona = DaytonaConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        ..Default::default()
    };
    config
}

fn kept(env: &TestEnv, argv: &[&str], provider: &str) -> RunCommand {
    let mut command = env.kept(argv);
    command.spec.as_mut().expect("spec").provider = provider.into();
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_e2b_session_pauses_resumes_and_replaces_an_expired_sandbox_once() {
    let env = TestEnv::new().await;
    let emulator = E2bEmulator::start(&env.home.join("e2b"))
        .await
        .expect("emulator");
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner_with(e2b_spawner(&env, &emulator)).await;
    let client = env.client().await;

    // Slow and flaky, as a real API is: every call still lands.
    emulator.faults().delay(Duration::from_millis(20));
    emulator.faults().fail_next(2, 503);
    emulator.faults().rate_limit_next(2);
    let command = kept(&env, &["sh", "-c", "echo one > notes.txt"], "e2b");
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let first = idle_after(&client, &run_id, 1).await;
    assert_eq!(first.provider, "e2b");
    assert!(emulator.sandbox_ids().contains(&first.sandbox_id));

    // Paused at E2B, then a continue resumes it (connect) and the files are there.
    session(&client, &run_id, session_command::Action::Pause).await;
    released(&client, &run_id, RunState::Paused).await;
    let provider = E2bProvider::new(e2b_config(&emulator)).expect("provider");
    let mut labels = Labels::new();
    labels.insert(LABEL_RUN_ID.into(), run_id.clone());
    let listed = provider.list(&labels).await.expect("list");
    assert!(
        listed.len() == 1 && listed[0].paused,
        "E2B shows it paused: {listed:?}"
    );
    continue_run(&client, &run_id, &["sh", "-c", "cat notes.txt"]).await;
    let second = idle_after(&client, &run_id, 2).await;
    assert_eq!(second.sandbox_id, first.sandbox_id);
    assert_eq!(
        second.exit_code,
        Some(0),
        "the file was kept: {}",
        second.reason
    );

    // Expired at E2B (404 on connect and detail): replaced, once.
    emulator.expire(&first.sandbox_id);
    continue_run(&client, &run_id, &["sh", "-c", "test ! -f notes.txt"]).await;
    let third = idle_after(&client, &run_id, 3).await;
    assert_ne!(third.sandbox_id, first.sandbox_id);
    assert!(third.reason.contains("404"), "says why: {}", third.reason);
    assert_eq!(third.exit_code, Some(0), "a fresh sandbox has no notes");
    assert_eq!(third.sandbox_epoch, 2);

    // Expired again while E2B refuses every create: the one replacement
    // this turn allows fails, and the run fails — no loop.
    emulator.expire(&third.sandbox_id);
    emulator.faults().refuse_next_creates(1000);
    continue_run(&client, &run_id, &["true"]).await;
    let failed = env.wait_terminal(&client, &run_id, LIMIT).await;
    assert_eq!(failed.state(), RunState::Failed);
    assert!(
        failed.reason.contains("replacement failed"),
        "{}",
        failed.reason
    );
    let attempts = emulator.faults().creates_refused();
    assert!(
        (1..=60).contains(&attempts),
        "one replacement, retried a bounded number of times: {attempts} creates"
    );
    emulator.faults().clear();

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daytona_sandbox_auto_deleted_is_replaced_and_a_stop_between_turns_deletes_it() {
    let env = TestEnv::new().await;
    let emulator = DaytonaEmulator::start(&env.home.join("daytona"))
        .await
        .expect("emulator");
    let tracker = env.start_tracker().await;
    let spawner = env
        .start_spawner_with(daytona_spawner(&env, &emulator))
        .await;
    let client = env.client().await;

    emulator.faults().fail_next(1, 502);
    let command = kept(&env, &["sh", "-c", "echo one > notes.txt"], "daytona");
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let first = idle_after(&client, &run_id, 1).await;
    continue_run(&client, &run_id, &["sh", "-c", "cat notes.txt"]).await;
    let second = idle_after(&client, &run_id, 2).await;
    assert_eq!(
        (second.sandbox_id.as_str(), second.exit_code),
        (first.sandbox_id.as_str(), Some(0))
    );

    emulator.expire(&first.sandbox_id);
    continue_run(&client, &run_id, &["true"]).await;
    let third = idle_after(&client, &run_id, 3).await;
    assert_ne!(third.sandbox_id, first.sandbox_id);
    assert!(
        third.reason.contains("sandbox replaced"),
        "{}",
        third.reason
    );

    stop_run(&client, &run_id, "done").await;
    let ended = env.wait_terminal(&client, &run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped);
    assert!(
        !emulator.sandbox_ids().contains(&third.sandbox_id),
        "a stopped run's sandbox is deleted at Daytona"
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// The reaper issue's orphan chaos, against E2B: spawner processes SIGKILLed
/// at random points and the tracker SIGKILLed every third round, while the
/// emulator loses create responses (the sandbox exists, the spawner never
/// learns its id) and answers 503s. In the end E2B and the records agree
/// exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_chaos_against_e2b_ends_in_exact_agreement() {
    let env = TestEnv::new().await;
    let emulator = E2bEmulator::start(&env.home.join("e2b"))
        .await
        .expect("emulator");
    let mut tracker = env.spawn_service_process("tracker", &[]);
    let client = env.client().await;
    tracker_answers(&client, "the tracker answers").await;
    let mut reaper_config = env.reaper_config();
    reaper_config.provider = "e2b".into();
    reaper_config.e2b = e2b_config(&emulator);
    let reaper = env.start_reaper_with(reaper_config).await;
    let (api_url, envd_url) = (emulator.url(), emulator.envd_url());
    let spawner_env = [
        ("CORRAL_HEARTBEAT_MS", "300"),
        ("CORRAL_COMMAND_ACK_WAIT_MS", "1500"),
        ("CORRAL_PROVIDER", "e2b"),
        ("CORRAL_E2B__API_URL", api_url.as_str()),
        ("CORRAL_E2B__ENVD_URL", envd_url.as_str()),
        ("E2B_API_KEY", "test-key"),
    ];
    let mut spawner = env.spawn_service_process("spawner", &spawner_env);
    let mut submitted = Vec::new();
    let rounds = 9;
    for round in 0..rounds {
        emulator.faults().lose_next_creates(1);
        emulator.faults().fail_next(1, 503);
        for _ in 0..4 {
            let mut command = env.command(&["sleep", "300"]);
            command.spec.as_mut().expect("spec").provider = "e2b".into();
            client.publish_run(&command).await.expect("publish");
            submitted.push(command.run_id);
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..400))).await;
        if round % 3 == 1 {
            tracker.kill().await.ok();
            tokio::time::sleep(Duration::from_millis(rand::random_range(50..400))).await;
        }
        spawner.kill().await.ok();
        if round % 3 == 1 {
            tracker = env.spawn_service_process("tracker", &[]);
        }
        spawner = env.spawn_service_process("spawner", &spawner_env);
    }

    // The survivors: runs the last spawner takes, still losing a create
    // answer, must end up running in exactly one sandbox each (once the
    // tracker, perhaps just restarted, answers).
    tracker_answers(&client, "the tracker answers after the chaos").await;
    emulator.faults().lose_next_creates(1);
    let mut survivors = Vec::new();
    for _ in 0..4 {
        let mut command = env.command(&["sleep", "300"]);
        command.spec.as_mut().expect("spec").provider = "e2b".into();
        client.start_run(&command).await.expect("start");
        survivors.push(command.run_id);
    }
    for run_id in &survivors {
        env.wait_state(&client, run_id, RunState::Running).await;
    }

    let provider: Arc<dyn Provider> =
        Arc::new(E2bProvider::new(e2b_config(&emulator)).expect("provider"));
    // An orphan for certain: a sandbox of this deployment that no record
    // claims (a spawner that died right after its create). Only the
    // reaper removes such a sandbox.
    let mut orphan_labels = Labels::new();
    orphan_labels.insert(LABEL_RUN_ID.into(), "never-recorded".into());
    orphan_labels.insert(corral_provider::LABEL_DEPLOYMENT.into(), env.prefix.clone());
    let orphan = provider
        .create(&corral_provider::CreateSpec {
            run_id: "never-recorded".into(),
            labels: orphan_labels,
            ..Default::default()
        })
        .await
        .expect("create the orphan");
    // Quiet: the records and E2B's listing agree, and so does E2B's own
    // view (not only its listing), looked at in the same moment: runs of
    // the killed spawners may still be ending, their sandboxes going.
    let (sandboxes, live) = eventually(
        "E2B's own view, its listing and the records agree",
        Duration::from_secs(120),
        || async {
            let (sandboxes, live) =
                provider_and_records_agree(&client, provider.as_ref(), &env.prefix).await?;
            let listed: std::collections::BTreeSet<String> =
                sandboxes.iter().map(|s| s.id.clone()).collect();
            let held: std::collections::BTreeSet<String> =
                emulator.sandbox_ids().into_iter().collect();
            (listed == held).then_some((sandboxes, live))
        },
    )
    .await;
    assert!(
        sandboxes.len() >= survivors.len(),
        "the survivors hold their sandboxes"
    );
    assert!(
        !emulator.sandbox_ids().contains(&orphan.id),
        "the reaper removed the orphan"
    );
    for run_id in &survivors {
        assert!(
            sandboxes
                .iter()
                .any(|s| s.labels.get(LABEL_RUN_ID) == Some(run_id)),
            "survivor {run_id} holds its sandbox"
        );
        assert!(
            live.iter().any(|r| &r.run_id == run_id),
            "survivor {run_id} is live"
        );
    }

    spawner.kill().await.ok();
    reaper.stop().await;
    tracker.kill().await.ok();
    env.cleanup().await;
}

/// A stop while the provider is really in its create call: Daytona has
/// made the sandbox and holds its answer. The run stops without ever
/// running, and the sandbox the create made is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_slow_create_deletes_what_the_create_made() {
    let env = TestEnv::new().await;
    let emulator = DaytonaEmulator::start(&env.home.join("daytona"))
        .await
        .expect("emulator");
    let tracker = env.start_tracker().await;
    let spawner = env
        .start_spawner_with(daytona_spawner(&env, &emulator))
        .await;
    let client = env.client().await;

    emulator.hold_creates(Duration::from_secs(3));
    let mut command = env.command(&["sh", "-c", "sleep 300"]);
    command.spec.as_mut().expect("spec").provider = "daytona".into();
    client.start_run(&command).await.expect("submit");
    eventually(
        "Daytona made the sandbox and holds the answer",
        LIMIT,
        || async { (emulator.created() == 1).then_some(()) },
    )
    .await;
    let booting = client.get(&command.run_id).await.expect("get");
    assert_eq!(
        booting.state(),
        RunState::Booting,
        "the create is in flight"
    );

    stop_run(&client, &command.run_id, "changed my mind").await;
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::Stopped, "changed my mind")
    );
    assert_eq!(run.running_at_ms, 0, "the agent never ran");
    eventually("the sandbox the create made is deleted", LIMIT, || async {
        emulator.sandbox_ids().is_empty().then_some(())
    })
    .await;
    assert_eq!(emulator.created(), 1, "one create, not retried");

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// A pause the provider refuses leaves the run idle (not paused, so not
/// billed as paused) with its sandbox running, and the next turn runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_the_provider_refuses_goes_back_to_idle() {
    let env = TestEnv::new().await;
    let emulator = E2bEmulator::start(&env.home.join("e2b"))
        .await
        .expect("emulator");
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner_with(e2b_spawner(&env, &emulator)).await;
    let client = env.client().await;

    let command = kept(&env, &["true"], "e2b");
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let first = idle_after(&client, &run_id, 1).await;

    // Refused outright (403), as a key that lost the right would be.
    emulator.faults().fail_next(1000, 403);
    session(&client, &run_id, session_command::Action::Pause).await;
    let back = eventually("the failed pause is undone", LIMIT, || async {
        env.lifecycle(&run_id)
            .await
            .into_iter()
            .map(|(_, event)| event)
            .find(|event| event.reason == "pause failed")
    })
    .await;
    emulator.faults().clear();
    assert_eq!((back.from(), back.to()), (RunState::Paused, RunState::Idle));
    let idle = released(&client, &run_id, RunState::Idle).await;
    assert_eq!(idle.sandbox_id, first.sandbox_id);
    let provider = E2bProvider::new(e2b_config(&emulator)).expect("provider");
    let sandbox = provider
        .list(&Labels::from([(LABEL_RUN_ID.to_owned(), run_id.clone())]))
        .await
        .expect("list")
        .into_iter()
        .find(|s| s.id == first.sandbox_id)
        .expect("the sandbox is still there");
    assert!(!sandbox.paused, "the sandbox runs, as the record says");

    continue_run(&client, &run_id, &["true"]).await;
    let second = idle_after(&client, &run_id, 2).await;
    assert_eq!(second.sandbox_id, first.sandbox_id);

    stop_run(&client, &run_id, "done").await;
    env.wait_terminal(&client, &run_id, LIMIT).await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_unavailable_before_a_turn_is_waited_out_or_leaves_the_run_idle() {
    let env = TestEnv::new().await;
    let emulator = E2bEmulator::start(&env.home.join("e2b"))
        .await
        .expect("emulator");
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner_with(e2b_spawner(&env, &emulator)).await;
    let client = env.client().await;

    let command = kept(&env, &["true"], "e2b");
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    let first = idle_after(&client, &run_id, 1).await;

    // Away for a moment (three 503s) while the kept sandbox is probed:
    // the probe retries and the turn runs in the same sandbox.
    emulator.faults().fail_next(3, 503);
    continue_run(&client, &run_id, &["true"]).await;
    let second = idle_after(&client, &run_id, 2).await;
    assert_eq!(
        emulator.faults().failures_served(),
        3,
        "the 503s were served"
    );
    assert_eq!(second.sandbox_id, first.sandbox_id);

    // Refusing every call (403): the turn is not run, the run goes back to
    // idle with its sandbox, and says why.
    emulator.faults().fail_next(1000, 403);
    continue_run(&client, &run_id, &["true"]).await;
    let skipped = eventually("the turn not run is recorded", LIMIT, || async {
        env.lifecycle(&run_id)
            .await
            .into_iter()
            .map(|(_, event)| event)
            .find(|event| event.reason.starts_with("turn not run"))
    })
    .await;
    let served = emulator.faults().failures_served();
    emulator.faults().clear();
    assert!(served > 3, "the refusals were served ({served})");
    assert_eq!(
        (skipped.from(), skipped.to()),
        (RunState::Running, RunState::Idle),
        "{}",
        skipped.reason
    );
    let idle = released(&client, &run_id, RunState::Idle).await;
    assert_eq!(idle.sandbox_id, first.sandbox_id, "the sandbox is kept");
    let provider = E2bProvider::new(e2b_config(&emulator)).expect("provider");
    let listed = provider
        .list(&Labels::from([(LABEL_RUN_ID.to_owned(), run_id.clone())]))
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![first.sandbox_id.as_str()],
        "one sandbox, the kept one"
    );

    // With the provider back, the next continue runs.
    continue_run(&client, &run_id, &["true"]).await;
    let next = idle_after(&client, &run_id, idle.turn + 1).await;
    assert_eq!(next.sandbox_id, first.sandbox_id);

    stop_run(&client, &run_id, "done").await;
    env.wait_terminal(&client, &run_id, LIMIT).await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
