//! corral on a 3-node NATS JetStream cluster (three `nats-server` 2.9
//! processes on loopback, every stream with three replicas): the node that
//! leads the streams dies mid-load, and several of every service run
//! through the orphan chaos, with nothing lost, nothing stored twice and
//! nothing orphaned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use corral_proto::v1::{AgentEvent, RunState, StopCommand};
use corral_provider::{Labels, LocalProvider, Provider};
use corral_tests::cluster::PrivateCluster;
use corral_tests::sessions::assert_provider_and_records_agree;
use corral_tests::{TestEnv, eventually, tracker_answers};
use prost::Message;

const LIMIT: Duration = Duration::from_secs(120);

/// Who holds the reaper's lease (its KV entry), if anyone.
async fn lease_holder(js: &async_nats::jetstream::Context, env: &TestEnv) -> Option<String> {
    let store = js
        .get_key_value(env.subjects.reaper_lease_bucket())
        .await
        .ok()?;
    let value = store.get("leader").await.ok()??;
    Some(String::from_utf8_lossy(&value).into_owned())
}

/// How many of each run's `agent.output` events are stored, and how many
/// distinct lines among them.
async fn stored_lines(env: &TestEnv) -> BTreeMap<String, (i64, i64)> {
    let pool = env.pool().await;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT run_id, count(*), count(DISTINCT payload->>'line') FROM sandbox_events
         WHERE kind = 'agent.output' GROUP BY run_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    pool.close().await;
    rows.into_iter()
        .map(|(run, all, distinct)| (run, (all, distinct)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_leading_the_streams_dies_mid_load_and_nothing_is_lost() {
    const RUNS: usize = 200;
    const LINES: i64 = 40;
    const SLEEPERS: usize = 10;

    let mut cluster = PrivateCluster::start().await;
    let env = TestEnv::on_cluster(&cluster).await;
    let js = cluster.jetstream().await;
    let tracker = env.start_tracker().await;

    // The reaper that leads is connected to n0 alone (the nodes advertise
    // no other): when n0 dies it is cut off. The standby knows every node.
    let mut cut_off = env.reaper_config();
    cut_off.nats_url = cluster.url(0);
    cut_off.reaper_id = "reaper-on-n0".into();
    let leading_reaper = env.start_reaper_with(cut_off).await;
    eventually("the reaper on n0 holds the lease", LIMIT, || async {
        (lease_holder(&js, &env).await? == "reaper-on-n0").then_some(())
    })
    .await;
    let mut standby = env.reaper_config();
    standby.reaper_id = "reaper-standby".into();
    let standby_reaper = env.start_reaper_with(standby).await;

    let spawners = [env.start_spawner().await, env.start_spawner().await];
    let (ingest, _) = env.start_ingest().await;
    let client = env.client().await;

    // n0 leads the command and events streams.
    cluster
        .move_leader(&js, &env.subjects.cmd_stream(), 0)
        .await;
    cluster
        .move_leader(&js, &env.subjects.events_stream(), 0)
        .await;

    // Load: runs printing a line every half second for 20 s, and sleepers
    // to stop once n0 is gone.
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do echo line-$i; i=$((i+1)); sleep 0.5; done");
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let command = env.command(&["sh", "-c", &script]);
        client.start_run(&command).await.expect("submit");
        runs.push(command.run_id);
    }
    let mut sleepers = Vec::new();
    for _ in 0..SLEEPERS {
        let command = env.command(&["sleep", "300"]);
        client.start_run(&command).await.expect("submit a sleeper");
        sleepers.push(command.run_id);
    }
    for run_id in &sleepers {
        env.wait_state(&client, run_id, RunState::Running).await;
    }
    // Events flowing: a good share of the runs have stored output.
    eventually("output of 100 runs is stored", LIMIT, || async {
        (stored_lines(&env).await.len() >= 100).then_some(())
    })
    .await;
    let before = {
        let mut stream = js
            .get_stream(env.subjects.events_stream())
            .await
            .expect("events stream");
        stream.info().await.expect("info").state.messages
    };

    let pool = env.pool().await;
    let (in_flight,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM runs WHERE run_id = ANY($1) AND state NOT IN ('completed', 'failed', 'stopped', 'timed_out')",
    )
    .bind(&runs)
    .fetch_one(&pool)
    .await
    .expect("runs in flight");
    pool.close().await;
    assert!(
        in_flight >= 150,
        "only {in_flight} of {RUNS} runs in flight when n0 dies: the load is over before the fault"
    );

    cluster.kill(0);

    // Stops still reach their owners: each sleeper ends stopped, its
    // sandbox gone.
    for run_id in &sleepers {
        let stop = StopCommand {
            run_id: run_id.clone(),
            reason: "after the leader died".into(),
            requested_by: "test".into(),
            requested_at_ms: corral_common::now_ms(),
        };
        eventually(&format!("the stop of {run_id} is taken"), LIMIT, || async {
            client.stop(&stop).await.ok()
        })
        .await;
    }
    for run_id in &sleepers {
        let run = env.wait_terminal(&client, run_id, LIMIT).await;
        assert_eq!(run.state(), RunState::Stopped, "{run_id}: {}", run.reason);
        eventually(
            &format!("the sandbox of stopped {run_id} is gone"),
            LIMIT,
            || async {
                LocalProvider::live_processes(&run.sandbox_id)
                    .is_empty()
                    .then_some(())
            },
        )
        .await;
    }

    // The lease moves to the standby: the leader cannot renew it.
    eventually("the standby reaper takes the lease", LIMIT, || async {
        (lease_holder(&js, &env).await? == "reaper-standby").then_some(())
    })
    .await;

    // No command lost: every run completes; no event lost or stored twice.
    for run_id in &runs {
        let run = env.wait_terminal(&client, run_id, LIMIT).await;
        assert_eq!(run.state(), RunState::Completed, "{run_id}: {}", run.reason);
    }
    let stored = eventually("every line of every run is stored", LIMIT, || async {
        let stored = stored_lines(&env).await;
        runs.iter()
            .all(|run| stored.get(run).is_some_and(|(all, _)| *all >= LINES))
            .then_some(stored)
    })
    .await;
    for run_id in &runs {
        assert_eq!(
            stored[run_id],
            (LINES, LINES),
            "run {run_id}: (events stored, distinct lines) after the leader died"
        );
    }

    // n0 comes back and catches up: every replica current, and n0, made
    // leader, holds everything the stream took while it was away.
    cluster.start_again(0).await;
    let events = env.subjects.events_stream();
    cluster.wait_current(&js, &env.subjects.cmd_stream()).await;
    cluster.wait_current(&js, &events).await;
    let expected = {
        let mut stream = js.get_stream(&events).await.expect("events stream");
        stream.info().await.expect("info").state.clone()
    };
    assert!(
        expected.messages > before,
        "the stream took events while n0 was away"
    );
    cluster.move_leader(&js, &events, 0).await;
    let on_n0 = {
        let mut stream = js.get_stream(&events).await.expect("events stream");
        stream.info().await.expect("info").state.clone()
    };
    assert_eq!(
        (on_n0.messages, on_n0.last_sequence),
        (expected.messages, expected.last_sequence),
        "n0, leading again, holds what the others took"
    );

    ingest.stop().await;
    for spawner in spawners {
        spawner.stop().await;
    }
    standby_reaper.stop().await;
    leading_reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_of_every_service_on_the_cluster_survive_the_orphan_chaos() {
    let cluster = PrivateCluster::start().await;
    let env = TestEnv::on_cluster(&cluster).await;
    let client = env.client().await;
    let mut trackers = vec![
        env.spawn_service_process("tracker", &[]),
        env.spawn_service_process("tracker", &[]),
    ];
    tracker_answers(&client, "a tracker answers").await;
    let reapers = [
        env.start_reaper_with(env.reaper_config()).await,
        env.start_reaper_with(env.reaper_config()).await,
    ];
    let ingests = [env.start_ingest().await.0, env.start_ingest().await.0];
    let spawner_env = [
        ("CORRAL_HEARTBEAT_MS", "300"),
        ("CORRAL_COMMAND_ACK_WAIT_MS", "1500"),
    ];
    let mut spawners: Vec<_> = (0..3)
        .map(|_| env.spawn_service_process("spawner", &spawner_env))
        .collect();

    // Agents print three lines, then live on.
    let argv = ["sh", "-c", "echo one; echo two; echo three; sleep 300"];
    let mut submitted = Vec::new();
    let rounds = 9;
    for round in 0..rounds {
        for _ in 0..4 {
            let command = env.command(&argv);
            // A tracker may be down: publish the command alone, as any
            // client may.
            client.publish_run(&command).await.expect("publish");
            submitted.push(command.run_id);
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..250))).await;
        // Faults: a spawner dies between command and running; every third
        // round a tracker dies too while sandboxes are created and recorded.
        let victim = round % spawners.len();
        if round % 3 == 1 {
            let which = (round / 3) % trackers.len();
            trackers[which].kill().await.ok();
            tokio::time::sleep(Duration::from_millis(rand::random_range(50..400))).await;
            trackers[which] = env.spawn_service_process("tracker", &[]);
        }
        spawners[victim].kill().await.ok();
        spawners[victim] = env.spawn_service_process("spawner", &spawner_env);
    }

    tracker_answers(&client, "a tracker answers after the chaos").await;
    let mut survivors = Vec::new();
    for _ in 0..4 {
        let command = env.command(&argv);
        client.start_run(&command).await.expect("submit a survivor");
        survivors.push(command.run_id);
    }
    for run_id in &survivors {
        env.wait_state(&client, run_id, RunState::Running).await;
    }

    // Provider and records in exact agreement: 0 orphans.
    let provider = env.local_provider();
    assert_provider_and_records_agree(&client, &provider, &env.prefix, &survivors, LIMIT).await;
    for run_id in &submitted {
        eventually(&format!("run {run_id} is recorded"), LIMIT, || async {
            client.get(run_id).await.ok()
        })
        .await;
    }

    // Every event in the stream once, and stored exactly once.
    let messages = env.stream_messages(&env.subjects.events_stream(), "").await;
    let mut in_stream: BTreeMap<(String, String), usize> = BTreeMap::new();
    for message in &messages {
        let event = AgentEvent::decode(message.payload.clone()).expect("an event");
        *in_stream.entry((event.run_id, event.event_id)).or_default() += 1;
    }
    let twice: Vec<_> = in_stream.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events in the stream twice: {twice:?}");
    for run_id in &survivors {
        assert!(
            in_stream.keys().filter(|(run, _)| run == run_id).count() >= 3,
            "survivor {run_id}'s three lines are in the stream"
        );
    }
    let expected: BTreeSet<(String, String)> = in_stream.into_keys().collect();
    let pool = env.pool().await;
    let stored = eventually("ingest stored every event of the stream", LIMIT, || async {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT run_id, event_id, count(*) FROM sandbox_events GROUP BY 1, 2")
                .fetch_all(&pool)
                .await
                .ok()?;
        (rows.len() >= expected.len()).then_some(rows)
    })
    .await;
    pool.close().await;
    assert!(
        stored.iter().all(|(_, _, n)| *n == 1),
        "an event stored twice"
    );
    let stored: BTreeSet<(String, String)> =
        stored.into_iter().map(|(run, id, _)| (run, id)).collect();
    assert_eq!(
        stored, expected,
        "the store holds exactly the stream's events"
    );
    eprintln!(
        "{} runs, {} events stored once each; outcomes: {:?}",
        submitted.len() + survivors.len(),
        expected.len(),
        env.outcome_counts().await
    );

    for spawner in &mut spawners {
        spawner.kill().await.ok();
    }
    for ingest in ingests {
        ingest.stop().await;
    }
    for reaper in reapers {
        reaper.stop().await;
    }
    for tracker in &mut trackers {
        tracker.kill().await.ok();
    }
    for sandbox in provider.list(&Labels::new()).await.expect("list") {
        provider.kill(&sandbox.id).await.expect("kill");
    }
    env.cleanup().await;
}
