//! Rotating the run-token key as README says, with real agents posting
//! their events over HTTP throughout: (1) event ingest gets the new key,
//! (2) the spawners are rolled to sign with it while an agent holding an
//! old-key token goes on, (3) the old key is dropped once no run holds it.
//! No agent gets a 401 on the way (an agent that does exits non-zero and
//! its run fails); a token of the dropped key is refused, naming its key.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_common::Secret;
use corral_common::token::Keyring;
use corral_proto::v1::RunState;
use corral_tests::{SHARED_IN_SANDBOX, TestEnv, corral_bin, eventually};

const LIMIT: Duration = Duration::from_secs(60);
/// Where sandboxes see the `corral` binary.
const AGENT: &str = "/opt/corral/bin/corral";
const K1: &str = "rotation-test-key-one-0123456789abcdef";
const K2: &str = "rotation-test-key-two-0123456789abcdef";

fn keys(list: &[(&str, &str)]) -> BTreeMap<String, Secret> {
    list.iter()
        .map(|(id, secret)| ((*id).to_owned(), Secret::new(*secret)))
        .collect()
}

/// A spawner whose agents post to `url`, signing with the greatest of `ring`.
fn spawner(env: &TestEnv, url: &str, ring: &[(&str, &str)]) -> corral_spawner::Config {
    let mut config = env.spawner_config();
    config.token_keys = keys(ring);
    config.events_url = url.to_owned();
    // The agent is `corral agent-demo`: the sandbox sees the binary.
    config
        .local
        .binds
        .push(format!("{}:{AGENT}:ro", corral_bin().display()));
    config.drain_timeout_ms = 60_000;
    config
}

/// Posts the reference agent's events, waits for `/shared/<gate>`, posts
/// them again (as a later turn of work would).
fn agent(env: &TestEnv, gate: &str) -> corral_proto::v1::RunCommand {
    let script = format!(
        "{AGENT} agent-demo --step-ms 20 && while [ ! -e {SHARED_IN_SANDBOX}/{gate} ]; do sleep 0.05; done && {AGENT} agent-demo --step-ms 20"
    );
    env.command(&["sh", "-c", &script])
}

/// The events the run's agent posted (not its output lines) stored so far.
async fn stored(url: &str, run_id: &str) -> usize {
    let page: serde_json::Value = match corral_tests::http()
        .get(format!("{url}/v1/runs/{run_id}/events?limit=1000"))
        .send()
        .await
    {
        Ok(response) => response.json().await.unwrap_or_default(),
        Err(_) => return 0,
    };
    page["events"].as_array().map_or(0, |events| {
        events
            .iter()
            .filter(|e| e["kind"] != "agent.output")
            .count()
    })
}

/// Waits until the agent of `run_id` stored its first seven events; fails
/// at once, with the agent's output, if the run ended instead.
async fn posted(env: &TestEnv, client: &corral_client::Client, url: &str, run_id: &str) {
    eventually("the agent posted its first events", LIMIT, || async {
        if let Ok(run) = client.get(run_id).await
            && run.state().is_terminal()
        {
            panic!(
                "run {run_id} ended {} ({}) before posting; output: {:?}",
                run.state().name(),
                run.reason,
                env.output(run_id).await
            );
        }
        (stored(url, run_id).await >= 7).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_token_key_never_refuses_a_running_agent() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;

    // (1) Ingest holds the old and the new key; the spawner still signs
    // with the old one.
    let mut ingest_config = env.ingest_config("127.0.0.1:0");
    ingest_config.token_secret = Secret::default();
    ingest_config.token_keys = keys(&[("k1", K1), ("k2", K2)]);
    let (ingest, url) = env.start_ingest_with(ingest_config.clone()).await;
    let old = env
        .start_spawner_with(spawner(&env, &url, &[("k1", K1)]))
        .await;
    let a = agent(&env, "go-a");
    client.start_run(&a).await.expect("submit a");
    posted(&env, &client, &url, &a.run_id).await;

    // (2) The spawners roll: a new one signs with k2, the old one drains
    // while agent a, holding a k1 token, goes on posting.
    let new = env
        .start_spawner_with(spawner(&env, &url, &[("k1", K1), ("k2", K2)]))
        .await;
    let draining = tokio::spawn(old.stop());
    let b = agent(&env, "go-b");
    client.start_run(&b).await.expect("submit b");
    std::fs::write(env.shared.join("go-a"), "").expect("release a");
    std::fs::write(env.shared.join("go-b"), "").expect("release b");
    for run in [&a, &b] {
        let ended = env.wait_terminal(&client, &run.run_id, LIMIT).await;
        assert_eq!(
            ended.state(),
            RunState::Completed,
            "run {}: {} (an agent refused by ingest exits non-zero)",
            run.run_id,
            ended.reason
        );
    }
    draining.await.expect("the old spawner drained");
    // Pages show what is settled, up to a second late (the watermark is
    // asked of NATS at most once a second): all fourteen must come.
    eventually(
        "all 14 events agent a posted, before and after the roll, are served",
        LIMIT,
        || async { (stored(&url, &a.run_id).await == 14).then_some(()) },
    )
    .await;

    // (3) No run holds a k1 token any more: ingest drops k1.
    ingest.stop().await;
    ingest_config.token_keys = keys(&[("k2", K2)]);
    ingest_config.listen = "127.0.0.1:0".into();
    let (ingest, url) = env.start_ingest_with(ingest_config).await;
    let newer = env
        .start_spawner_with(spawner(&env, &url, &[("k2", K2)]))
        .await;
    new.stop().await;
    let c = agent(&env, "go-c");
    client.start_run(&c).await.expect("submit c");
    posted(&env, &client, &url, &c.run_id).await;
    // A token signed with the dropped key, for the same live run: refused.
    let stale =
        Keyring::single("k1", K1.as_bytes()).mint(&c.run_id, corral_common::now_ms() + 600_000);
    let refused = corral_tests::http()
        .post(format!("{url}/v1/runs/{}/events", c.run_id))
        .bearer_auth(&stale)
        .header("content-type", "application/json")
        .body(r#"{"kind": "agent.heartbeat", "seq": 99}"#)
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = refused.json().await.unwrap_or_default();
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("key \"k1\""), "names the key: {error}");
    std::fs::write(env.shared.join("go-c"), "").expect("release c");
    let ended = env.wait_terminal(&client, &c.run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Completed, "{}", ended.reason);

    newer.stop().await;
    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
