//! Deadlines, silent agents, dead owners, failover and orphan chaos: real
//! processes, real NATS and PostgreSQL.

use std::time::Duration;

use async_nats::jetstream::kv;
use corral_proto::v1::{RunCommand, RunState, StopCommand, stop_reply::Outcome};
use corral_provider::{
    CreateSpec, LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, LocalProvider, Provider,
};
use corral_tests::sessions::assert_provider_and_records_agree;
use corral_tests::{TestEnv, eventually, tracker_answers};

const LIMIT: Duration = Duration::from_secs(60);

fn with_timeouts(mut command: RunCommand, timeout: i32, idle: i32) -> RunCommand {
    let spec = command.spec.as_mut().expect("spec");
    spec.timeout_secs = timeout;
    spec.idle_timeout_secs = idle;
    command
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

fn assert_no_process(sandbox_id: &str) {
    assert!(!sandbox_id.is_empty());
    assert!(
        LocalProvider::live_processes(sandbox_id).is_empty(),
        "{sandbox_id} still has processes"
    );
}

async fn last_actor(env: &TestEnv, run_id: &str) -> String {
    let pool = env.pool().await;
    let (actor,): (String,) = sqlx::query_as(
        "SELECT actor FROM run_transitions WHERE run_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(run_id)
    .fetch_one(&pool)
    .await
    .expect("a transition");
    pool.close().await;
    actor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_enforces_inactivity_and_absolute_timeouts() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let silent = with_timeouts(env.command(&["sh", "-c", "echo once; sleep 300"]), 60, 2);
    let chatty = with_timeouts(
        env.command(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.5; done",
        ]),
        60,
        2,
    );
    let endless = with_timeouts(
        env.command(&["sh", "-c", "while true; do echo tick; sleep 0.2; done"]),
        2,
        60,
    );
    for command in [&silent, &chatty, &endless] {
        client.start_run(command).await.expect("submit");
    }

    let run = env.wait_terminal(&client, &silent.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::TimedOut, "inactivity")
    );
    let silent_for = run.finished_at_ms - run.running_at_ms;
    assert!(
        (2000..3500).contains(&silent_for),
        "ended {silent_for} ms after start, window 2 s"
    );
    assert_no_process(&run.sandbox_id);

    let run = env.wait_terminal(&client, &chatty.run_id, LIMIT).await;
    assert_eq!(
        run.state(),
        RunState::Completed,
        "output every 0.5 s keeps a 2 s window open: {}",
        run.reason
    );

    let run = env.wait_terminal(&client, &endless.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::TimedOut, "deadline")
    );
    let late = run.finished_at_ms - run.deadline_at_ms;
    assert!(
        late < 1000 + 1000,
        "the owner kills within a second of the deadline (plus grace): {late} ms"
    );
    assert_no_process(&run.sandbox_id);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_enforces_a_deadline_when_the_owner_is_frozen() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut spawner = env.spawn_spawner_process(&[]).await;
    let mut config = env.reaper_config();
    config.owner_timeout_ms = 60_000; // frozen, not lost: the deadline must do it
    let reaper = env.start_reaper_with(config).await;
    let client = env.client().await;

    let command = with_timeouts(env.command(&["sleep", "300"]), 2, 60);
    client.start_run(&command).await.expect("submit");
    let running = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;
    signal(spawner.pid(), libc::SIGSTOP);

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::TimedOut, "deadline")
    );
    assert!(
        last_actor(&env, &command.run_id)
            .await
            .starts_with("reaper:"),
        "the reaper, not the frozen owner"
    );
    assert_no_process(&running.sandbox_id);

    signal(spawner.pid(), libc::SIGCONT);
    spawner.kill_hard().await;
    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_a_sigkilled_owner_end_owner_lost_and_a_stop_still_kills_its_sandbox() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut spawner = env.spawn_spawner_process(&[]).await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let client = env.client().await;

    let lost = env.command(&["sleep", "300"]);
    let stopped = env.command(&["sleep", "300"]);
    client.start_run(&lost).await.expect("submit");
    client.start_run(&stopped).await.expect("submit");
    let lost_run = env
        .wait_state(&client, &lost.run_id, RunState::Running)
        .await;
    let stopped_run = env
        .wait_state(&client, &stopped.run_id, RunState::Running)
        .await;
    spawner.kill_hard().await;

    let stop = StopCommand {
        run_id: stopped.run_id.clone(),
        reason: "owner is dead".into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    let (outcome, _) = client.stop(&stop).await.expect("stop");
    assert_eq!(
        outcome,
        Outcome::Accepted,
        "the stop is recorded though nobody routes it"
    );
    let run = env.wait_terminal(&client, &stopped.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::Stopped, "owner is dead")
    );
    // The tracker's times: the reaper's stop grace (1 s), a sweep, and
    // slack for a loaded machine.
    let took = Duration::from_millis((run.finished_at_ms - run.stop_requested_at_ms) as u64);
    assert!(
        took < Duration::from_millis(1000 + 200) + Duration::from_secs(4),
        "within the reaper's stop grace: {took:?}"
    );
    assert_no_process(&stopped_run.sandbox_id);

    let run = env.wait_terminal(&client, &lost.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::Failed, "owner_lost")
    );
    assert_no_process(&lost_run.sandbox_id);

    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reaper_takes_over_when_the_leader_dies() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let fast = [
        ("CORRAL_SWEEP_PERIOD_MS", "200"),
        ("CORRAL_LEASE_TTL_MS", "1500"),
    ];
    let mut reapers = vec![
        env.spawn_service_process(
            "reaper",
            &[fast[0], fast[1], ("CORRAL_REAPER_ID", "reaper-a")],
        ),
        env.spawn_service_process(
            "reaper",
            &[fast[0], fast[1], ("CORRAL_REAPER_ID", "reaper-b")],
        ),
    ];
    let client = env.client().await;
    let bucket = env.subjects.reaper_lease_bucket();
    let leader = eventually("a reaper takes the lease", LIMIT, || async {
        let store: kv::Store = client.jetstream().get_key_value(&bucket).await.ok()?;
        let value = store.get("leader").await.ok()??;
        Some(String::from_utf8_lossy(&value).into_owned())
    })
    .await;
    let (dead, standby) = if leader == "reaper-a" {
        (0, "reaper-b")
    } else {
        (1, "reaper-a")
    };
    let pid = reapers[dead].id().expect("pid") as i32;
    signal(pid, libc::SIGKILL);
    let _ = reapers[dead].wait().await;
    let store = client
        .jetstream()
        .get_key_value(&bucket)
        .await
        .expect("bucket");
    // The dead leader's last renewal, as the server stamped it: it can
    // renew no more.
    let held = store
        .entry("leader")
        .await
        .expect("lease entry")
        .expect("a lease is held");
    let dead_id = if dead == 0 { "reaper-a" } else { "reaper-b" };
    assert_eq!(
        String::from_utf8_lossy(&held.value),
        dead_id,
        "the lease expired before the test could read the last renewal"
    );
    let last_renewal = held.created;
    let taken = eventually("the standby takes the lease", LIMIT, || async {
        let entry = store.entry("leader").await.ok()??;
        (String::from_utf8_lossy(&entry.value) == standby).then_some(entry.created)
    })
    .await;
    // Server times: the lease expires a TTL after the last renewal, and the
    // standby tries every third of one; the slack is for a loaded machine.
    let gap = taken - last_renewal;
    assert!(
        gap < time::Duration::milliseconds(1500 + 500) + time::Duration::seconds(3),
        "takeover within the lease TTL (+ slack): {gap}"
    );
    assert!(
        gap >= time::Duration::milliseconds(1000),
        "the standby took a lease that had not expired: {gap}"
    );

    // An orphan appears: the surviving reaper of this node removes it.
    let provider = env.local_provider();
    let mut labels = Labels::new();
    labels.insert(LABEL_RUN_ID.into(), "no-such-run".into());
    labels.insert(LABEL_DEPLOYMENT.into(), env.prefix.clone());
    let orphan = provider
        .create(&CreateSpec {
            run_id: "no-such-run".into(),
            labels,
            ..Default::default()
        })
        .await
        .expect("create");
    eventually("the surviving reaper reaps the orphan", LIMIT, || async {
        (!env.home.join("sandboxes").join(&orphan.id).exists()).then_some(())
    })
    .await;
    assert!(
        provider
            .list(&Labels::new())
            .await
            .expect("list")
            .is_empty()
    );

    for mut reaper in reapers {
        let _ = reaper.kill().await;
    }
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_chaos_leaves_the_provider_and_the_records_in_exact_agreement() {
    let env = TestEnv::new().await;
    let mut tracker = env.spawn_service_process("tracker", &[]);
    let client = env.client().await;
    tracker_answers(&client, "the tracker answers").await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let spawner_env = [
        ("CORRAL_HEARTBEAT_MS", "300"),
        ("CORRAL_COMMAND_ACK_WAIT_MS", "1500"),
    ];
    let mut spawner = env.spawn_service_process("spawner", &spawner_env);
    let mut submitted = Vec::new();
    let rounds = 12;
    for round in 0..rounds {
        for _ in 0..4 {
            let command = env.command(&["sleep", "300"]);
            // The tracker may be down: publish the command alone, as any client may.
            client.publish_run(&command).await.expect("publish");
            submitted.push(command.run_id);
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..250))).await;
        // Faults: the spawner dies between command and running; every third
        // round the tracker (so the database behind it) is gone while
        // sandboxes are being created and recorded.
        if round % 3 == 1 {
            signal(tracker.id().expect("pid") as i32, libc::SIGKILL);
            let _ = tracker.wait().await;
            tokio::time::sleep(Duration::from_millis(rand::random_range(50..400))).await;
        }
        signal(spawner.id().expect("pid") as i32, libc::SIGKILL);
        let _ = spawner.wait().await;
        if round % 3 == 1 {
            tracker = env.spawn_service_process("tracker", &[]);
        }
        spawner = env.spawn_service_process("spawner", &spawner_env);
    }

    // Survivors: runs the last spawner takes run, each in its sandbox
    // (once the tracker, perhaps just restarted, answers).
    tracker_answers(&client, "the tracker answers after the chaos").await;
    let mut survivors = Vec::new();
    for _ in 0..4 {
        let command = env.command(&["sleep", "300"]);
        client.start_run(&command).await.expect("submit a survivor");
        survivors.push(command.run_id);
    }
    for run_id in &survivors {
        env.wait_state(&client, run_id, RunState::Running).await;
    }

    // Quiet: after reconciliation every sandbox is claimed by a live run and
    // every live run that should hold a sandbox holds a listed one.
    let provider = env.local_provider();
    assert_provider_and_records_agree(
        &client,
        &provider,
        &env.prefix,
        &survivors,
        Duration::from_secs(90),
    )
    .await;
    // Every run submitted in the chaos is recorded; one that ended says why.
    for run_id in &submitted {
        let run = eventually(&format!("run {run_id} is recorded"), LIMIT, || async {
            client.get(run_id).await.ok()
        })
        .await;
        if run.state().is_terminal() {
            assert!(
                !run.reason.is_empty() || run.state() == RunState::Completed,
                "run {run_id} ended {} without a reason",
                run.state().name()
            );
        }
    }

    spawner.kill().await.ok();
    reaper.stop().await;
    tracker.kill().await.ok();
    for sandbox in provider.list(&Labels::new()).await.expect("list") {
        provider.kill(&sandbox.id).await.expect("kill");
    }
    env.cleanup().await;
}

/// Publishes `kind` events for `run_id` every 300 ms until `stop` is cancelled.
fn emit(
    env: &TestEnv,
    client: &corral_client::Client,
    run_id: &str,
    kind: &'static str,
) -> tokio_util::sync::CancellationToken {
    use prost::Message;
    let stop = tokio_util::sync::CancellationToken::new();
    let (client, subject, run_id, token) = (
        client.clone(),
        env.subjects.events(run_id, kind),
        run_id.to_owned(),
        stop.clone(),
    );
    tokio::spawn(async move {
        let mut seq = 0;
        while !token.is_cancelled() {
            seq += 1;
            let event = corral_proto::v1::AgentEvent {
                event_id: corral_client::new_run_id(),
                run_id: run_id.clone(),
                seq,
                at_ms: corral_common::now_ms(),
                kind: kind.into(),
                payload: None,
            };
            let _ = client
                .jetstream()
                .publish(subject.clone(), event.encode_to_vec().into())
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_do_not_hold_off_the_inactivity_timeout_but_progress_events_do() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let heartbeating = with_timeouts(env.command(&["sleep", "300"]), 60, 2);
    let working = with_timeouts(env.command(&["sleep", "4"]), 60, 2);
    for command in [&heartbeating, &working] {
        client.start_run(command).await.expect("submit");
        env.wait_state(&client, &command.run_id, RunState::Running)
            .await;
    }
    let heartbeats = emit(&env, &client, &heartbeating.run_id, "agent.heartbeat");
    let progress = emit(&env, &client, &working.run_id, "agent.tool_use");

    let run = env
        .wait_terminal(&client, &heartbeating.run_id, LIMIT)
        .await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::TimedOut, "inactivity")
    );
    assert_no_process(&run.sandbox_id);
    let run = env.wait_terminal(&client, &working.run_id, LIMIT).await;
    assert_eq!(
        run.state(),
        RunState::Completed,
        "tool use every 300 ms keeps a silent agent alive: {}",
        run.reason
    );
    heartbeats.cancel();
    progress.cancel();

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_pending_with_no_command_to_carry_it_is_failed_saying_so() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.reaper_config();
    config.pending_limit_ms = 1000;
    let reaper = env.start_reaper_with(config).await;
    let client = env.client().await;

    // Recorded, but its command never reaches a spawner (lost, or
    // dead-lettered after the claim horizon).
    let command = env.command(&["true"]);
    client.submit(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Failed);
    assert!(
        run.reason.starts_with("pending_unclaimed"),
        "the reason says so: {}",
        run.reason
    );
    assert!(
        run.finished_at_ms - run.created_at_ms >= 1000,
        "not before the limit"
    );

    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_returns_every_live_run_past_the_size_of_one_reply() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let client = env.client().await;
    // 12,000 live runs: one reply of them all would pass NATS's 1 MiB limit
    // (about 8,000, as one message each).
    let pool = env.pool().await;
    sqlx::query(
        "INSERT INTO runs (run_id, state, spec, provider, timeout_secs, idle_timeout_secs, owner, sandbox_id)
         SELECT 'live-' || lpad(i::text, 6, '0'), 'running', '\\x'::bytea, 'local', 300, 60,
                'some-spawner-with-a-long-enough-name-' || i, 'sbx-0123456789abcdef0123456789abcdef-node-' || i
         FROM generate_series(1, 12000) AS i",
    )
    .execute(&pool)
    .await
    .expect("seed");
    pool.close().await;

    let request = corral_proto::v1::SweepRequest {
        include_live: true,
        ..Default::default()
    };
    // Asked in one page, the reply would not fit.
    let one_page = corral_proto::v1::SweepRequest {
        live_limit: 20_000,
        ..request.clone()
    };
    assert!(
        client.sweep(&one_page).await.is_err(),
        "12,000 live runs should not fit in one reply"
    );
    let (_, live) = client.sweep(&request).await.expect("sweep");
    assert_eq!(live.len(), 12_000, "every live run, over several pages");
    let ids: std::collections::BTreeSet<&str> = live.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids.len(), 12_000, "no run twice");
    assert!(live.iter().all(|r| r.provider == "local"));

    tracker.stop().await;
    env.cleanup().await;
}

/// A `sleep` running under an owner (a spawner process) that is then
/// frozen (SIGSTOP), beside a reaper with `config`. A reaper judges no
/// sandbox lost before it has watched owners for an owner timeout and a
/// sweep (its evidence rule): a time rule, waited out as such before the
/// owner freezes.
struct FrozenOwner {
    tracker: corral_tests::InProcess,
    spawner: corral_tests::ServiceProcess,
    reaper: corral_tests::InProcess,
    client: corral_client::Client,
    command: RunCommand,
    running: corral_proto::v1::Run,
}

impl FrozenOwner {
    async fn start(env: &TestEnv, config: corral_reaper::Config) -> FrozenOwner {
        let tracker = env.start_tracker().await;
        let spawner = env.spawn_spawner_process(&[]).await;
        let evidence = Duration::from_millis(u64::from(config.owner_timeout_ms) + 200 + 300);
        let reaper_started = tokio::time::Instant::now();
        let reaper = env.start_reaper_with(config).await;
        let client = env.client().await;
        let command = env.command(&["sleep", "300"]);
        client.start_run(&command).await.expect("submit");
        let running = env
            .wait_state(&client, &command.run_id, RunState::Running)
            .await;
        tokio::time::sleep_until(reaper_started + evidence).await;
        signal(spawner.pid(), libc::SIGSTOP);
        FrozenOwner {
            tracker,
            spawner,
            reaper,
            client,
            command,
            running,
        }
    }

    async fn stop(self, env: TestEnv) {
        signal(self.spawner.pid(), libc::SIGCONT);
        self.spawner.stop().await;
        self.reaper.stop().await;
        self.tracker.stop().await;
        env.cleanup().await;
    }
}

/// A running run's sandbox gone behind the back of an owner that cannot
/// tell (frozen): the reaper fails it `sandbox_lost`, once. When the owner
/// wakes and reports its agent's death, the run's end stands: the reaper
/// ended it at the version it judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_gone_behind_a_frozen_owner_is_judged_lost_once() {
    let env = TestEnv::new().await;
    let mut config = env.reaper_config();
    // The frozen owner is judged lost 4 s after its last heartbeat; its
    // sandbox, a second after it is found gone.
    config.owner_timeout_ms = 4000;
    let frozen = FrozenOwner::start(&env, config).await;
    let (client, command, running, spawner) = (
        &frozen.client,
        &frozen.command,
        &frozen.running,
        &frozen.spawner,
    );
    env.local_provider()
        .kill(&running.sandbox_id)
        .await
        .expect("the sandbox killed behind corral's back");

    let run = env.wait_terminal(client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::Failed, "sandbox_lost")
    );
    assert!(
        last_actor(&env, &command.run_id)
            .await
            .starts_with("reaper:"),
        "the reaper, not the frozen owner"
    );

    // The owner wakes, finds its agent gone and lets the run go.
    let woke = corral_common::now_ms();
    signal(spawner.pid(), libc::SIGCONT);
    eventually("the woken owner holds no run", LIMIT, || async {
        let spawners = client.spawners().await.ok()?;
        let me = spawners
            .into_iter()
            .find(|s| s.spawner_id == spawner.spawner_id)?;
        (me.heartbeat_at_ms > woke && me.owned_runs == 0).then_some(())
    })
    .await;
    let after = client.get(&command.run_id).await.expect("get");
    assert_eq!(
        (after.state(), after.reason.as_str(), after.version),
        (RunState::Failed, "sandbox_lost", run.version),
        "the run's end stands"
    );
    // The relay announces after the commit: wait for the end to appear.
    let terminal: Vec<_> = eventually("the run's end is announced", LIMIT, || async {
        let terminal: Vec<_> = env
            .lifecycle(&command.run_id)
            .await
            .into_iter()
            .filter(|(_, e)| RunState::try_from(e.to).is_ok_and(|s| s.is_terminal()))
            .collect();
        (!terminal.is_empty()).then_some(terminal)
    })
    .await;
    assert_eq!(terminal.len(), 1, "one end announced: {terminal:?}");

    frozen.stop(env).await;
}

/// A run asked to stop whose sandbox is gone while its owner cannot record
/// the end (frozen here; slowed by a tracker's leader election in the
/// cluster test that found this): the stop was honoured, so the reaper ends
/// the run `stopped` with the stop's reason, not `sandbox_lost`. The stop
/// grace is long, so it is the sandbox check, not the stop rule, that ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_whose_sandbox_is_gone_ends_stopped_not_lost() {
    let env = TestEnv::new().await;
    let mut config = env.reaper_config();
    // The frozen owner would be judged lost 6 s after its last heartbeat;
    // the sandbox is judged after a grace of a second.
    config.owner_timeout_ms = 6000;
    config.stop_grace_ms = 60_000;
    let frozen = FrozenOwner::start(&env, config).await;
    let (client, command, running) = (&frozen.client, &frozen.command, &frozen.running);
    let stop = StopCommand {
        run_id: command.run_id.clone(),
        reason: "user pressed stop".into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    let (outcome, _) = client.stop(&stop).await.expect("stop");
    assert_eq!(outcome, Outcome::Accepted);
    env.local_provider()
        .kill(&running.sandbox_id)
        .await
        .expect("the sandbox killed, as its owner would on the stop");

    let run = env.wait_terminal(client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::Stopped, "user pressed stop"),
        "a stop honoured is not a lost sandbox"
    );
    assert!(
        last_actor(&env, &command.run_id)
            .await
            .starts_with("reaper:"),
        "the reaper, not the frozen owner"
    );

    frozen.stop(env).await;
}

/// A boot that never finishes: past `boot_limit_ms` the reaper fails the
/// run `stuck_boot` and kills the sandbox it was booting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_stuck_past_its_limit_is_failed_and_its_sandbox_killed() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.spawner_config();
    // Longer than the boot limit (5 s), short enough for the spawner to
    // finish it and stop at the end of the test.
    config.boot_delay_ms = 15_000;
    let spawner = env.start_spawner_with(config).await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let client = env.client().await;

    let command = env.command(&["sleep", "300"]);
    client.start_run(&command).await.expect("submit");
    let booting = client
        .wait_until(&command.run_id, LIMIT, |run| {
            (run.state() == RunState::Booting && !run.sandbox_id.is_empty())
                || run.state().is_terminal()
        })
        .await
        .expect("the sandbox is recorded while booting");
    assert_eq!(booting.state(), RunState::Booting);

    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(
        (run.state(), run.reason.as_str()),
        (RunState::Failed, "stuck_boot")
    );
    assert_eq!(run.running_at_ms, 0, "the agent never ran");
    let waited = Duration::from_millis((run.finished_at_ms - run.booting_at_ms) as u64);
    assert!(
        waited >= Duration::from_millis(5000),
        "failed before the boot limit: {waited:?}"
    );
    let sandboxes = env.home.join("sandboxes");
    eventually("the booting sandbox is killed", LIMIT, || async {
        (!sandboxes.join(&booting.sandbox_id).exists()).then_some(())
    })
    .await;

    spawner.stop().await;
    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
