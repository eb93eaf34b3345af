//! Stop from anywhere: durable, routed to the owner, not ignorable, in every
//! phase, and fenced against finalize (a real `git push`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use corral_client::RunUpdate;
use corral_proto::v1::{RunState, StopCommand, stop_reply::Outcome};
use corral_provider::{LocalProvider, Provider};
use corral_tests::{TestEnv, corral_bin, eventually};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(60);

fn stop_command(run_id: &str, reason: &str) -> StopCommand {
    StopCommand {
        run_id: run_id.into(),
        reason: reason.into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    }
}

fn assert_sandbox_gone(env: &TestEnv, sandbox_id: &str) {
    assert!(!sandbox_id.is_empty(), "the run should have had a sandbox");
    assert!(
        LocalProvider::live_processes(sandbox_id).is_empty(),
        "processes of {sandbox_id} survived"
    );
    assert!(
        !env.home.join("sandboxes").join(sandbox_id).exists(),
        "{sandbox_id} still on disk"
    );
}

/// What a bound measured by the system's own times allows beyond the
/// promise, for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corral_stop_from_a_fourth_process_stops_runs_whichever_of_three_spawners_owns_them() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut spawners = Vec::new();
    for _ in 0..3 {
        spawners.push(env.spawn_spawner_process(&[("CORRAL_MAX_RUNS", "2")]).await);
    }
    let client = env.client().await;
    let mut runs = Vec::new();
    for _ in 0..6 {
        let command = env.command(&["sleep", "300"]);
        client.start_run(&command).await.expect("submit");
        runs.push(command.run_id);
    }
    let mut owners = std::collections::BTreeSet::new();
    for id in &runs {
        owners.insert(env.wait_state(&client, id, RunState::Running).await.owner);
    }
    assert_eq!(owners.len(), 3, "each spawner owns two runs: {owners:?}");

    for id in &runs {
        let output = tokio::process::Command::new(corral_bin())
            .args([
                "--prefix",
                &env.prefix,
                "--json",
                "stop",
                id,
                "--reason",
                "user pressed stop",
                "--wait",
            ])
            .env("NATS_URL", &env.nats_url)
            .output()
            .await
            .expect("corral stop runs");
        assert!(
            output.status.success(),
            "corral stop failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        assert_eq!(answer["outcome"], "accepted", "{answer}");
        assert_eq!(answer["run"]["state"], "stopped", "{answer}");
        assert_eq!(answer["run"]["reason"], "user pressed stop", "{answer}");
        let run = client.get(id).await.expect("get");
        assert!(run.stop_requested_at_ms > 0, "the stop is recorded");
        assert!(
            run.stop_requested_by.starts_with("cli:"),
            "{}",
            run.stop_requested_by
        );
        assert_sandbox_gone(&env, &run.sandbox_id);
    }

    // Repeated and late stops are harmless and say what happened.
    let (outcome, _) = client
        .stop(&stop_command(&runs[0], "again"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::AlreadyTerminal);
    let (outcome, _) = client
        .stop(&stop_command("no-such-run", "x"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::NotFound);

    for spawner in spawners {
        spawner.stop().await;
    }
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_traps_sigterm_is_killed_after_the_grace() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.spawner_config();
    config.kill_grace_ms = 500;
    let spawner = env.start_spawner_with(config).await;
    let client = env.client().await;

    let command = env.command(&[
        "sh",
        "-c",
        "trap '' TERM; echo ready; while true; do sleep 1; done",
    ]);
    let mut watch = client.watch(&command.run_id).await.expect("watch");
    client.start_run(&command).await.expect("submit");
    tokio::time::timeout(LIMIT, async {
        while let Some(update) = watch.next().await {
            if let RunUpdate::Agent(event) = update
                && format!("{:?}", event.payload).contains("ready")
            {
                return;
            }
        }
    })
    .await
    .expect("the agent should say ready");

    let (outcome, _) = client
        .stop(&stop_command(&command.run_id, "stubborn"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::Accepted);
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Stopped);
    assert_eq!(run.reason, "stubborn");
    // Measured by the tracker's own times (stop recorded, run ended), with
    // room for a loaded machine: the speed is `corral bench stop`'s.
    let took = Duration::from_millis((run.finished_at_ms - run.stop_requested_at_ms) as u64);
    assert!(
        took >= Duration::from_millis(500),
        "SIGKILL came before the grace: {took:?}"
    );
    assert!(
        took < Duration::from_millis(500) + SLACK,
        "gone within the grace (+ {SLACK:?} for load), took {took:?}"
    );
    assert_sandbox_gone(&env, &run.sandbox_id);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_pending_means_the_run_never_boots() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let command = env.command(&["sleep", "300"]);
    client.start_run(&command).await.expect("submit");

    let (outcome, run) = client
        .stop(&stop_command(&command.run_id, "changed my mind"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::Accepted);
    assert_eq!(
        run.expect("run").state(),
        RunState::Stopped,
        "no owner: the tracker stops it at once"
    );

    // The queued command reaches a spawner later and is dropped.
    let spawner = env.start_spawner().await;
    eventually("the command queue drains", LIMIT, || async {
        let mut stream = client
            .jetstream()
            .get_stream(env.subjects.cmd_stream())
            .await
            .ok()?;
        (stream.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;
    let run = client.get(&command.run_id).await.expect("get");
    assert_eq!(run.state(), RunState::Stopped);
    assert_eq!(run.booting_at_ms, 0, "never booted");
    assert!(run.sandbox_id.is_empty(), "never had a sandbox");
    assert!(
        env.local_provider()
            .list(&Default::default())
            .await
            .expect("list")
            .is_empty()
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_booting_kills_the_new_sandbox_and_the_run_never_runs() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.spawner_config();
    config.boot_delay_ms = 30_000;
    let spawner = env.start_spawner_with(config).await;
    let client = env.client().await;

    let command = env.command(&["sleep", "300"]);
    client.start_run(&command).await.expect("submit");
    let booting = eventually(
        "the sandbox id is recorded while booting",
        LIMIT,
        || async {
            let run = client.get(&command.run_id).await.ok()?;
            (run.state() == RunState::Booting && !run.sandbox_id.is_empty()).then_some(run)
        },
    )
    .await;
    assert!(
        env.home
            .join("sandboxes")
            .join(&booting.sandbox_id)
            .exists()
    );

    let (outcome, _) = client
        .stop(&stop_command(&command.run_id, "too slow"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::Accepted);
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    // The boot takes 30 s: ending well before it proves the stop did not
    // wait for it.
    let took = Duration::from_millis((run.finished_at_ms - run.stop_requested_at_ms) as u64);
    assert!(
        took < Duration::from_secs(15),
        "the stop waited for the boot: {took:?}"
    );
    assert_eq!(run.state(), RunState::Stopped);
    assert_eq!(run.running_at_ms, 0, "never reached running");
    assert_sandbox_gone(&env, &booting.sandbox_id);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    // The bare repository belongs to the sandboxes' agent user.
    Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(dir)
        .args(args)
        .output()
        .expect("git runs")
}

fn pushed(bare: &Path, run_id: &str) -> bool {
    git(
        bare,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/run-{run_id}"),
        ],
    )
    .status
    .success()
}

/// Where sandboxes see the bare repository (bound from the test's home).
const ORIGIN: &str = "/origin.git";

/// The agent commits to a clone of the bare repository at [`ORIGIN`], then
/// sleeps `linger`; finalize pushes.
fn git_run(env: &TestEnv, linger: &str) -> corral_proto::v1::RunCommand {
    let script = format!(
        "set -e; git clone -q {ORIGIN} repo 2>/dev/null; cd repo; git checkout -qb run-$CORRAL_RUN_ID; \
         echo $CORRAL_RUN_ID > work.txt; git add work.txt; \
         git -c user.name=agent -c user.email=agent@corral commit -qm work; sleep {linger}"
    );
    let mut command = env.command(&["sh", "-c", &script]);
    command.spec.as_mut().expect("spec").finalize = "cd repo && git push -q origin HEAD".into();
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_pushes_only_runs_that_completed_without_a_stop() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let bare = env.home.join("origin.git");
    assert!(
        Command::new("git")
            .args(["init", "-q", "--bare"])
            .arg(&bare)
            .status()
            .expect("git")
            .success()
    );
    // The agent (an unprivileged user in its sandbox) pushes to it.
    let agent = corral_provider::LocalConfig::default();
    assert!(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", agent.agent_uid, agent.agent_gid))
            .arg(&bare)
            .status()
            .expect("chown")
            .success()
    );
    let mut config = env.spawner_config();
    config
        .local
        .binds
        .push(format!("{}:{ORIGIN}:rw", bare.display()));
    let spawner = env.start_spawner_with(config).await;

    // A normal run's commit reaches the remote.
    let normal = git_run(&env, "0");
    client.start_run(&normal).await.expect("submit");
    let run = env.wait_terminal(&client, &normal.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    assert!(run.finalizing_at_ms > 0);
    assert!(
        pushed(&bare, &normal.run_id),
        "the normal run's commit should be pushed"
    );

    // A run stopped while the agent works never pushes.
    let stopped = git_run(&env, "30");
    client.start_run(&stopped).await.expect("submit");
    env.wait_state(&client, &stopped.run_id, RunState::Running)
        .await;
    let (outcome, _) = client
        .stop(&stop_command(&stopped.run_id, "stop"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::Accepted);
    let run = env.wait_terminal(&client, &stopped.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Stopped);
    assert_eq!(run.finalizing_at_ms, 0);
    assert!(!pushed(&bare, &stopped.run_id));

    // A stop that meets a finalize in progress (the branch the race below
    // may or may not hit): the finalize is past the fence and finishes.
    let mut slow = git_run(&env, "0");
    slow.spec.as_mut().expect("spec").finalize =
        "sleep 2; cd repo && git push -q origin HEAD".into();
    client.start_run(&slow).await.expect("submit");
    env.wait_state(&client, &slow.run_id, RunState::Finalizing)
        .await;
    let (outcome, _) = client
        .stop(&stop_command(&slow.run_id, "during finalize"))
        .await
        .expect("stop");
    assert_eq!(outcome, Outcome::FinalizeInProgress);
    let run = env.wait_terminal(&client, &slow.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    assert!(
        pushed(&bare, &slow.run_id),
        "the finalize finished its push"
    );

    // The race: stops at random moments around the agent's exit, 100 times.
    let (mut accepted, mut in_finalize, mut too_late, mut pushes) = (0, 0, 0, 0);
    let mut completed_too_late = 0;
    for i in 0..100u64 {
        let command = git_run(&env, "0.02");
        client.start_run(&command).await.expect("submit");
        env.wait_state(&client, &command.run_id, RunState::Running)
            .await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..60))).await;
        let (outcome, _) = client
            .stop(&stop_command(&command.run_id, "race"))
            .await
            .expect("stop");
        let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
        let was_pushed = pushed(&bare, &command.run_id);
        pushes += was_pushed as u32;
        match outcome {
            Outcome::Accepted | Outcome::AlreadyRequested => {
                accepted += 1;
                assert!(
                    !was_pushed,
                    "iteration {i}: pushed after an acknowledged stop"
                );
                assert_ne!(
                    run.state(),
                    RunState::Completed,
                    "iteration {i}: {}",
                    run.reason
                );
            }
            Outcome::FinalizeInProgress => {
                in_finalize += 1;
                assert_eq!(
                    run.state(),
                    RunState::Completed,
                    "iteration {i}: finalize past the fence finishes"
                );
                assert!(was_pushed, "iteration {i}");
            }
            Outcome::AlreadyTerminal => {
                too_late += 1;
                completed_too_late += (run.state() == RunState::Completed) as u32;
                assert_eq!(
                    was_pushed,
                    run.state() == RunState::Completed,
                    "iteration {i}"
                );
            }
            other => panic!("iteration {i}: unexpected outcome {other:?}"),
        }
    }
    println!(
        "finalize race: {accepted} stops acknowledged (0 pushes among them), {in_finalize} during finalize, \
         {too_late} after the end; {pushes} pushes in all"
    );
    assert_eq!(
        accepted + in_finalize + too_late,
        100,
        "every stop answered"
    );
    assert!(accepted > 0, "the race should include acknowledged stops");
    assert_eq!(
        pushes,
        in_finalize + completed_too_late,
        "a push for exactly the runs that completed"
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_published_before_its_run_is_known_still_prevents_the_boot() {
    use prost::Message;
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    // A client that only publishes: the run command, then its stop, on the
    // subjects, before any spawner runs and without asking the tracker.
    let command = env.command(&["sleep", "300"]);
    client.publish_run(&command).await.expect("publish run");
    let stop = stop_command(&command.run_id, "published stop");
    client
        .jetstream()
        .publish(
            env.subjects.cmd_stop(&command.run_id),
            stop.encode_to_vec().into(),
        )
        .await
        .expect("publish stop")
        .await
        .expect("stop acknowledged");
    let pool = env.pool().await;
    eventually("the tracker keeps the early stop", LIMIT, || async {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT run_id FROM early_stops WHERE run_id = $1")
                .bind(&command.run_id)
                .fetch_optional(&pool)
                .await
                .ok()?;
        row.map(|_| ())
    })
    .await;
    pool.close().await;

    let spawner = env.start_spawner().await;
    let run = eventually("the run appears, stopped", LIMIT, || async {
        let run = client.get(&command.run_id).await.ok()?;
        run.state().is_terminal().then_some(run)
    })
    .await;
    assert_eq!(run.state(), RunState::Stopped);
    assert_eq!(run.reason, "published stop");
    assert_eq!(run.booting_at_ms, 0, "never booted");

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_published_while_postgres_is_down_is_carried_out_at_once_and_recorded_later() {
    let env = TestEnv::new().await;
    let postgres = corral_tests::PrivatePostgres::start();
    let mut config = env.tracker_config();
    config.database_url = corral_common::Secret::new(postgres.url());
    let tracker = env.start_tracker_with(config).await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let n = corral_tests::unique_secs();
    let command = env.command(&["sleep", &n.to_string()]);
    client.start_run(&command).await.expect("submit");
    env.wait_state(&client, &command.run_id, RunState::Running)
        .await;

    // PostgreSQL goes away; a stop is published straight on the run's stop
    // subject, as a platform without the tracker's answer would.
    postgres.stop();
    let stop = stop_command(&command.run_id, "while the database is away");
    client
        .jetstream()
        .publish(
            env.subjects.cmd_stop(&command.run_id),
            prost::Message::encode_to_vec(&stop).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    // The owner heard it: the agent is gone while nothing can be recorded.
    eventually("the owner kills the agent at once", LIMIT, || async {
        corral_tests::processes_with_cmdline(&format!("sleep {n}"))
            .is_empty()
            .then_some(())
    })
    .await;
    // Away longer than the stop consumer's old 10 deliveries a second apart.
    tokio::time::sleep(Duration::from_secs(12)).await;
    postgres.start_again();

    let run = eventually("the stop is recorded", LIMIT, || async {
        let run = client.get(&command.run_id).await.ok()?;
        (run.stop_requested_at_ms > 0).then_some(run)
    })
    .await;
    assert_eq!(run.stop_reason, "while the database is away");
    let dead = env
        .stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("cmd"))
        .await;
    assert!(dead.is_empty(), "the stop was not dead-lettered");

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// A finalize that fails fails the run, saying how, with its exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalize_that_fails_fails_the_run_saying_how() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let mut command = env.command(&["true"]);
    command.spec.as_mut().expect("spec").finalize = "echo pushing; exit 4".into();
    client.start_run(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str(), run.exit_code),
        (RunState::Failed, "finalize failed: exit code 4", Some(4))
    );
    assert!(
        env.output(&command.run_id)
            .await
            .contains(&"pushing".to_owned()),
        "finalize's output is the run's"
    );

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

/// Stops that retrying cannot fix (a payload that is no StopCommand, one
/// naming another run than its subject) are dead-lettered with a reason;
/// the stop behind them is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stops_are_dead_lettered_and_the_next_is_recorded() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    let command = env.command(&["true"]);
    client.submit(&command).await.expect("submit");
    let js = client.jetstream();
    let garbage = js
        .publish(env.subjects.cmd_stop("run-x"), vec![0xff, 0x01].into())
        .await
        .expect("publish");
    garbage.await.expect("ack");
    let mismatched = stop_command("run-y", "wrong subject").encode_to_vec();
    js.publish(env.subjects.cmd_stop("run-z"), mismatched.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let good = stop_command(&command.run_id, "changed my mind").encode_to_vec();
    js.publish(env.subjects.cmd_stop(&command.run_id), good.into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    client
        .wait_until(&command.run_id, LIMIT, |run| run.stop_requested_at_ms > 0)
        .await
        .expect("the good stop is recorded");
    let dead = eventually("two stops dead-lettered", LIMIT, || async {
        let dead = env
            .stream_messages(&env.subjects.dlq_stream(), &env.subjects.dlq("cmd"))
            .await;
        (dead.len() >= 2).then_some(dead)
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
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("did not decode as StopCommand"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("\"run-y\"") && errors[1].contains("\"run-z\""),
        "{errors:?}"
    );

    tracker.stop().await;
    env.cleanup().await;
}
