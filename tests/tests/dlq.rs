//! Dead letters are visible and replayable: `corral dlq ls`, `show` and
//! `replay`, run as a user would, against real NATS.

use std::time::Duration;

use corral_proto::v1::RunState;
use corral_tests::{TestEnv, corral_bin, eventually};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

async fn corral(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(corral_bin())
        .args(["--nats-url", &env.nats_url, "--prefix", &env.prefix])
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIMIT, output)
        .await
        .expect("corral should answer")
        .expect("corral runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

async fn listed(env: &TestEnv) -> Vec<Value> {
    let (ok, text) = corral(env, &["--json", "dlq", "ls"]).await;
    assert!(ok, "{text}");
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_replayed_to_completion() {
    let env = TestEnv::new().await;
    // No tracker yet, and a short claim horizon: the command is given up.
    let mut config = env.spawner_config();
    config.claim_horizon_ms = 300;
    let spawner = env.start_spawner_with(config).await;
    let client = env.client().await;
    eventually("the spawner made the streams", LIMIT, || async {
        client
            .jetstream()
            .get_stream(env.subjects.cmd_stream())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let command = env.command(&["true"]);
    client.publish_run(&command).await.expect("publish");
    client
        .jetstream()
        .publish(env.subjects.cmd_run(), "not a command".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let letters = eventually("both commands are dead-lettered", LIMIT, || async {
        let letters = listed(&env).await;
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let find = |needle: &str| {
        letters
            .iter()
            .find(|l| l["error"].as_str().unwrap_or_default().contains(needle))
            .unwrap_or_else(|| panic!("no dead letter saying {needle:?}: {letters:?}"))
            .clone()
    };
    let claim = find("claim_horizon_ms");
    let garbage = find("did not decode as RunCommand");
    for letter in [&claim, &garbage] {
        assert_eq!(letter["kind"], "cmd");
        assert_eq!(letter["original_subject"], env.subjects.cmd_run());
    }

    let seq = claim["seq"].as_u64().expect("seq").to_string();
    let (ok, shown) = corral(&env, &["dlq", "show", &seq]).await;
    assert!(ok, "{shown}");
    assert!(shown.contains("RunCommand"), "decoded: {shown}");
    assert!(shown.contains(&command.run_id), "{shown}");
    assert!(shown.contains("claim_horizon_ms"), "the error: {shown}");

    // The cause fixed (the tracker is back), the command is replayed.
    let tracker = env.start_tracker().await;
    let (ok, replayed) = corral(&env, &["dlq", "replay", &seq]).await;
    assert!(ok, "{replayed}");
    eventually("the replayed run is claimed", LIMIT, || async {
        client.get(&command.run_id).await.ok()
    })
    .await;
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let left = listed(&env).await;
    assert_eq!(left.len(), 1, "only the garbage is left: {left:?}");
    assert_eq!(left[0]["seq"], garbage["seq"]);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
