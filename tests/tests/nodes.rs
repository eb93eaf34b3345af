//! Node-local things are judged on their node (I9): two nodes, each a
//! spawner and a reaper with its own `CORRAL_HOME` and node id, one tracker.
//! Neither fails nor kills the other's runs; a node that dies leaves its
//! runs `owner_lost` and kills its sandboxes when it comes back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use corral_proto::v1::{RunState, StopCommand};
use corral_tests::{ServiceProcess, TestEnv, eventually, processes_with_cmdline, unique_secs};

const LIMIT: Duration = Duration::from_secs(60);
const SWEEP_MS: u64 = 200;

struct Node {
    id: String,
    home: PathBuf,
    spawner: ServiceProcess,
    reaper: tokio::process::Child,
}

fn node_env(id: &str, home: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("CORRAL_HOME".into(), home.display().to_string()),
        ("CORRAL_LOCAL__NODE".into(), id.into()),
    ]
}

fn start_reaper(env: &TestEnv, id: &str, home: &std::path::Path) -> tokio::process::Child {
    let mut vars = node_env(id, home);
    vars.extend([
        ("CORRAL_REAPER_ID".into(), format!("reaper-{id}")),
        ("CORRAL_SWEEP_PERIOD_MS".into(), SWEEP_MS.to_string()),
        ("CORRAL_LEASE_TTL_MS".into(), "1500".into()),
        ("CORRAL_OWNER_TIMEOUT_MS".into(), "2000".into()),
        ("CORRAL_STOP_GRACE_MS".into(), "1000".into()),
    ]);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.spawn_service_process("reaper", &vars)
}

async fn start_node(env: &TestEnv, id: &str) -> Node {
    let home = env.home.join(id);
    std::fs::create_dir_all(&home).expect("node home");
    let mut vars = node_env(id, &home);
    vars.push(("CORRAL_MAX_RUNS".into(), "6".into()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let spawner = env.spawn_spawner_process(&vars).await;
    let reaper = start_reaper(env, id, &home);
    Node {
        id: id.into(),
        home,
        spawner,
        reaper,
    }
}

fn stop_command(run_id: &str) -> StopCommand {
    StopCommand {
        run_id: run_id.into(),
        reason: "done".into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_fail_or_kill_each_others_runs() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut a = start_node(&env, "node-a").await;
    let mut b = start_node(&env, "node-b").await;
    let client = env.client().await;

    // 12 runs, at most 6 per spawner: both nodes hold some.
    let n = unique_secs();
    let mut runs = Vec::new();
    for i in 0..12 {
        let command = env.command(&["sleep", &(n + i).to_string()]);
        client.start_run(&command).await.expect("submit");
        runs.push(command.run_id);
    }
    let mut node_of: BTreeMap<String, String> = BTreeMap::new();
    for id in &runs {
        let run = env.wait_state(&client, id, RunState::Running).await;
        let node = corral_provider::local::node_of_sandbox(&run.sandbox_id)
            .expect("a local sandbox id names its node")
            .to_owned();
        node_of.insert(id.clone(), node);
    }
    let on_a: Vec<&String> = runs.iter().filter(|r| node_of[*r] == a.id).collect();
    let on_b: Vec<&String> = runs.iter().filter(|r| node_of[*r] == b.id).collect();
    assert_eq!(on_a.len() + on_b.len(), 12);
    assert_eq!(on_a.len(), 6, "each node holds six runs");

    // Three sweep periods of both reapers: nothing is judged lost.
    let pool = env.pool().await;
    let sweeps = || async {
        tokio::time::sleep(Duration::from_millis(3 * SWEEP_MS + 100)).await;
    };
    sweeps().await;
    let live: Vec<(String,)> = sqlx::query_as("SELECT state FROM runs WHERE state = 'running'")
        .fetch_all(&pool)
        .await
        .expect("runs");
    assert_eq!(live.len(), 12, "every run still running after three sweeps");

    // One run on each node stopped: its processes are gone, on its node.
    for id in [on_a[0], on_b[0]] {
        client.stop(&stop_command(id)).await.expect("stop");
        let run = env.wait_terminal(&client, id, LIMIT).await;
        assert_eq!(run.state(), RunState::Stopped);
    }

    // Node A dies whole: spawner and reaper SIGKILLed. Its runs end
    // owner_lost (judged by B's reaper, the leader now); its sandboxes stay
    // until it comes back (nobody else can reach them); B's runs go on.
    a.spawner.kill_hard().await;
    let _ = a.reaper.kill().await;
    for id in &on_a[1..] {
        let run = env.wait_terminal(&client, id, LIMIT).await;
        assert_eq!(run.state(), RunState::Failed, "{id}");
        assert_eq!(run.reason, "owner_lost", "{id}");
    }
    let a_sleeps: Vec<String> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| node_of[*r] == a.id && *r != on_a[0])
        .map(|(i, _)| format!("sleep {}", n + i as u32))
        .collect();
    for needle in &a_sleeps {
        assert!(
            !processes_with_cmdline(needle).is_empty(),
            "{needle} of the dead node's sandbox is still there"
        );
    }
    for id in &on_b[1..] {
        let run = client.get(id).await.expect("get");
        assert_eq!(run.state(), RunState::Running, "{id} of node B untouched");
    }

    // Node A's reaper comes back and reconciles its own sandboxes first.
    a.reaper = start_reaper(&env, &a.id, &a.home);
    eventually(
        "node A kills its sandboxes when it comes back",
        LIMIT,
        || async {
            a_sleeps
                .iter()
                .all(|needle| processes_with_cmdline(needle).is_empty())
                .then_some(())
        },
    )
    .await;
    for id in &on_b[1..] {
        let run = client.get(id).await.expect("get");
        assert_eq!(run.state(), RunState::Running, "{id} of node B untouched");
    }

    // Stopping the rest leaves no process on either node.
    for id in &on_b[1..] {
        client.stop(&stop_command(id)).await.expect("stop");
        env.wait_terminal(&client, id, LIMIT).await;
    }
    for i in 0..12u32 {
        let needle = format!("sleep {}", n + i);
        eventually(&format!("{needle} is gone"), LIMIT, || async {
            processes_with_cmdline(&needle).is_empty().then_some(())
        })
        .await;
    }
    for node in [&a, &b] {
        let sandboxes = node.home.join("sandboxes");
        eventually(
            &format!("{} has no sandbox left on disk", node.id),
            Duration::from_secs(10),
            || async {
                let left = std::fs::read_dir(&sandboxes)
                    .map(|d| d.count())
                    .unwrap_or(0);
                (left == 0).then_some(())
            },
        )
        .await;
    }

    pool.close().await;
    let _ = a.reaper.kill().await;
    let _ = b.reaper.kill().await;
    b.spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
