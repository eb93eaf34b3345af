//! Graceful drain: a spawner given SIGTERM takes no new command, keeps
//! heartbeating while its runs finish (so the reaper leaves them alone),
//! says it drains (`corral ls` shows it), and exits once they are done.

use std::time::Duration;

use corral_proto::v1::RunState;
use corral_tests::{TestEnv, corral_bin, eventually};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawner_given_sigterm_drains_its_runs_and_says_so() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let reaper_config = env.reaper_config();
    let owner_timeout_ms = reaper_config.owner_timeout_ms as i64;
    let reaper = env.start_reaper_with(reaper_config).await;
    let mut draining = env
        .spawn_spawner_process(&[("CORRAL_DRAIN_TIMEOUT_MS", "120000")])
        .await;
    let id = draining.spawner_id.clone();
    let client = env.client().await;

    // A run that goes on until the test lets it finish.
    let command = env.command(&[
        "sh",
        "-c",
        "while [ ! -f /shared/go ]; do sleep 0.1; done; echo finished",
    ]);
    client.start_run(&command).await.expect("submit");
    let running = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;
    assert_eq!(running.owner, id);

    let sigterm_at = corral_common::now_ms();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(draining.pid(), libc::SIGTERM) };

    // It says it drains, and until when.
    let state = eventually("the spawner reports that it drains", LIMIT, || async {
        client
            .spawners()
            .await
            .ok()?
            .into_iter()
            .find(|s| s.spawner_id == id && s.draining_since_ms > 0)
    })
    .await;
    assert!(
        state.drain_deadline_ms >= sigterm_at + 110_000,
        "deadline {} is the drain timeout after SIGTERM at {sigterm_at}",
        state.drain_deadline_ms
    );
    assert_eq!(state.owned_runs, 1);
    let ls = tokio::process::Command::new(corral_bin())
        .arg("ls")
        .env("NATS_URL", &env.nats_url)
        .env("CORRAL_SUBJECT_PREFIX", &env.prefix)
        .output()
        .await
        .expect("corral ls runs");
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{listed}");
    assert!(
        listed.contains(&format!("{id} (draining)")),
        "the run's owner is marked draining:\n{listed}"
    );
    assert!(
        listed.contains(&format!("spawner {id} is draining: 1 run(s) left")),
        "{listed}"
    );

    // It takes no new command: another spawner runs every one.
    let other = env.start_spawner().await;
    let mut later = Vec::new();
    for _ in 0..4 {
        let command = env.command(&["true"]);
        client.start_run(&command).await.expect("submit");
        later.push(command);
    }
    for command in &later {
        let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
        assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
        assert_ne!(run.owner, id, "a draining spawner took a new command");
    }

    // It goes on heartbeating past the reaper's owner timeout.
    eventually(
        "the draining spawner heartbeats past the owner timeout",
        LIMIT,
        || async {
            client.spawners().await.ok()?.into_iter().find(|s| {
                s.spawner_id == id && s.heartbeat_at_ms > sigterm_at + 2 * owner_timeout_ms
            })
        },
    )
    .await;
    let still = client.get(&command.run_id).await.expect("get");
    assert_eq!(still.state(), RunState::Running, "{}", still.reason);

    // Its run finishes as the agent decides, and then it exits, cleanly.
    std::fs::write(env.shared.join("go"), "").expect("release the agent");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    assert_eq!(run.exit_code, Some(0));
    let status = tokio::time::timeout(LIMIT, draining.child.wait())
        .await
        .expect("the drained spawner exits")
        .expect("wait");
    assert!(status.success(), "{status}");

    other.stop().await;
    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
