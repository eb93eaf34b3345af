//! The sandbox is a boundary (I8): nothing an agent starts outlives its
//! sandbox, however it detached; the agent sees only its own sandbox; its
//! limits hold against a hostile agent; pause freezes everything in it.
//! Processes are found through /proc by their unique command lines, never
//! through corral's own bookkeeping.

use std::collections::BTreeSet;
use std::time::Duration;

use corral_client::Client;
use corral_proto::v1::{RunCommand, RunState, StopCommand};
use corral_provider::local::{is_alive, is_paused};
use corral_tests::sessions::{idle_after, released, session};
use corral_tests::{TestEnv, eventually, processes_with_cmdline, unique_secs};

const LIMIT: Duration = Duration::from_secs(60);

fn stop_command(run_id: &str) -> StopCommand {
    StopCommand {
        run_id: run_id.into(),
        reason: "user pressed stop".into(),
        requested_by: "test".into(),
        requested_at_ms: corral_common::now_ms(),
    }
}

/// An agent that leaves children every way a process can leave its group:
/// `setsid`, a double fork, `nohup`, `env -i` (no environment marker), and
/// a child that moved itself to a process group of its own. The agent
/// itself sleeps on. Returns the command and the children's command lines.
fn escaping_agent(env: &TestEnv) -> (RunCommand, Vec<String>) {
    let n = unique_secs();
    let needles: Vec<String> = (0..6).map(|i| format!("sleep {}", n + i)).collect();
    let script = format!(
        "setsid sleep {a} & \
         (sh -c 'sleep {b} &' &); \
         nohup sleep {c} >/dev/null 2>&1 & \
         env -i /bin/sleep {d} & \
         perl -e 'setpgrp(0, 0); exec \"sleep\", \"{e}\"' & \
         echo started; exec sleep {f}",
        a = n,
        b = n + 1,
        c = n + 2,
        d = n + 3,
        e = n + 4,
        f = n + 5,
    );
    (env.command(&["sh", "-c", &script]), needles)
}

async fn all_started(needles: &[String]) {
    eventually("every child of the agent runs", LIMIT, || async {
        needles
            .iter()
            .all(|needle| !processes_with_cmdline(needle).is_empty())
            .then_some(())
    })
    .await;
}

async fn none_left(needles: &[String], after: &str) {
    eventually(
        &format!("no process of the agent left after {after}"),
        Duration::from_secs(10),
        || async {
            needles
                .iter()
                .all(|needle| processes_with_cmdline(needle).is_empty())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_every_process_of_the_agent_however_it_detached() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let (command, needles) = escaping_agent(&env);
    client.start_run(&command).await.expect("submit");
    env.wait_state(&client, &command.run_id, RunState::Running)
        .await;
    all_started(&needles).await;
    client
        .stop(&stop_command(&command.run_id))
        .await
        .expect("stop");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Stopped, "{}", run.reason);
    none_left(&needles, "the stop").await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_ends_every_process_of_the_agent_however_it_detached() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    let (mut command, needles) = escaping_agent(&env);
    command.spec.as_mut().expect("spec").timeout_secs = 3;
    client.start_run(&command).await.expect("submit");
    all_started(&needles).await;
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::TimedOut, "{}", run.reason);
    none_left(&needles, "the timeout").await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_ends_every_process_of_a_dead_owners_agent() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut spawner = env.spawn_spawner_process(&[]).await;
    let reaper = env.start_reaper_with(env.reaper_config()).await;
    let client = env.client().await;

    let (command, needles) = escaping_agent(&env);
    client.start_run(&command).await.expect("submit");
    env.wait_state(&client, &command.run_id, RunState::Running)
        .await;
    all_started(&needles).await;
    spawner.kill_hard().await;
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(run.reason, "owner_lost");
    none_left(&needles, "the reaper's kill").await;

    reaper.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_sees_only_its_own_sandbox() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // A secret in the environment of a process on this machine, and a
    // neighbour sandbox: neither may be visible from the agent's.
    let secret = format!("corral-test-secret-{}", unique_secs());
    let host_secs = unique_secs();
    let mut host = tokio::process::Command::new("sleep")
        .arg(host_secs.to_string())
        .env("CORRAL_TEST_SECRET", &secret)
        .kill_on_drop(true)
        .spawn()
        .expect("a host process");
    let neighbour = env.command(&["sleep", "300"]);
    client.start_run(&neighbour).await.expect("submit");
    let neighbour_run = env
        .wait_state(&client, &neighbour.run_id, RunState::Running)
        .await;

    // The script computes the host process's command line, so its own
    // command line does not contain it.
    let before_host = host_secs - 1;
    let script = format!(
        "echo uid $(id -u); echo host $(hostname); \
         echo caps $(grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status | cut -f2 | sort -u); \
         echo nnp $(grep '^NoNewPrivs:' /proc/self/status | cut -f2); \
         echo groups $(id -G); echo gid $(id -g); \
         echo session-leader $(( $(cut -d' ' -f6 /proc/$$/stat) == $$ )); \
         echo core $(ulimit -c); \
         host=\"sleep $(({before_host} + 1))\"; \
         for p in /proc/[0-9]*; do \
           c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); \
           case \"$c\" in *\"$host\"*) echo seen-host-process;; esac; \
           e=$(tr '\\0' ' ' < $p/environ 2>/dev/null); \
           case \"$e\" in *{secret}*) echo seen-secret;; esac; \
         done; \
         echo procs $(ls -d /proc/[0-9]* | wc -l); \
         echo parent $(ls -A .. | tr '\\n' ' '); \
         cat ../sandbox.json >/dev/null 2>&1 && echo read-state; \
         for d in / /etc /usr /bin /home /root /var /dev /proc/sys/kernel /sys /work /tmp; do \
           touch $d/corral-probe 2>/dev/null && echo writable $d; \
         done"
    );
    let command = env.command(&["sh", "-c", &script]);
    client.start_run(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let lines = env.output(&command.run_id).await;
    let line = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
            .clone()
    };
    assert_ne!(line("uid "), "uid 0", "the agent is not root");
    assert_eq!(
        line("caps "),
        "caps 0000000000000000",
        "no capability in any set (inheritable, permitted, effective, bounding, ambient)"
    );
    assert_eq!(line("nnp "), "nnp 1", "no way to gain privileges");
    assert_eq!(
        line("groups ")["groups ".len()..],
        line("gid ")["gid ".len()..],
        "no supplementary groups"
    );
    assert_eq!(
        line("session-leader "),
        "session-leader 1",
        "a session of its own"
    );
    assert_eq!(line("core "), "core 0", "no core files");
    assert_eq!(
        line("host "),
        format!("host {}", run.sandbox_id),
        "its own UTS namespace"
    );
    assert!(
        !lines.contains(&"seen-host-process".to_owned()),
        "a host process is visible: {lines:?}"
    );
    assert!(
        !lines.contains(&"seen-secret".to_owned()),
        "a host process's environment is readable: {lines:?}"
    );
    let procs: usize = line("procs ")["procs ".len()..]
        .trim()
        .parse()
        .expect("a count");
    assert!(procs <= 8, "only the sandbox's own processes: {procs}");
    let parent = line("parent ");
    assert!(
        !parent.contains("sbx-") && !parent.contains("sandbox.json"),
        "`..` shows no other sandbox and no state: {parent}"
    );
    assert!(!lines.contains(&"read-state".to_owned()));
    let writable: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("writable "))
        .collect();
    assert_eq!(
        writable,
        BTreeSet::from(["/tmp", "/work"]),
        "only the work directory and /tmp are writable"
    );
    assert!(
        !env.local_provider()
            .work_dir(&neighbour_run.sandbox_id)
            .join("corral-probe")
            .exists()
    );

    client
        .stop(&stop_command(&neighbour.run_id))
        .await
        .expect("stop");
    env.wait_terminal(&client, &neighbour.run_id, LIMIT).await;
    let _ = host.kill().await;
    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_contained_and_stopped_within_the_grace() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.spawner_config();
    config.local.pids_max = 64;
    config.local.cpu_millis = 500;
    let grace_ms = config.kill_grace_ms as i64;
    let spawner = env.start_spawner_with(config).await;
    let client = env.client().await;

    let n = unique_secs();
    // The bomb runs in a subshell: when forks start failing it dies, and
    // the agent itself lives on (no fork needed for `exec`) until stopped.
    let script = format!("echo armed; (b() {{ sleep {n} & b | b & }}; b); exec sleep {n}");
    let command = env.command(&["sh", "-c", &script]);
    client.start_run(&command).await.expect("submit");
    let run = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;
    let provider = env.local_provider();
    // The bomb grows until the kernel refuses its forks at the limit.
    eventually(
        "the fork bomb reaches its sandbox's limit",
        LIMIT,
        || async {
            provider
                .pids_limit_hits(&run.sandbox_id)
                .filter(|hits| *hits > 0)
        },
    )
    .await;
    let held = provider.processes(&run.sandbox_id).len();
    assert!(held <= 64, "{held} processes in a sandbox limited to 64");

    client
        .stop(&stop_command(&command.run_id))
        .await
        .expect("stop");
    let ended = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped, "{}", ended.reason);
    let took = ended.finished_at_ms - ended.stop_requested_at_ms;
    assert!(
        took <= grace_ms + 1000,
        "stopped {took} ms after the stop was recorded (grace {grace_ms} ms)"
    );
    none_left(&[format!("sleep {n}")], "the stop").await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_held_to_its_limit_and_stoppable() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client = env.client().await;

    // Four processes, each under the per-process limit alone, together far
    // over the sandbox's: the control group holds the sum.
    let n = unique_secs();
    let script = format!(
        "for i in 1 2 3 4; do (x=aaaaaaaa; while true; do x=$x$x; done) & done; \
         echo hogging; exec sleep {n}"
    );
    let mut command = env.command(&["sh", "-c", &script]);
    command.spec.as_mut().expect("spec").memory_mib = 64;
    client.start_run(&command).await.expect("submit");
    let run = env
        .wait_state(&client, &command.run_id, RunState::Running)
        .await;
    // Every hog (a subshell still carrying the script as its command line)
    // dies out of memory while the agent itself, now `sleep N`, lives on.
    let provider = env.local_provider();
    let in_sandbox = |needle: &str| {
        let sandbox: BTreeSet<i32> = provider.processes(&run.sandbox_id).into_iter().collect();
        processes_with_cmdline(needle)
            .into_iter()
            .filter(|pid| sandbox.contains(pid))
            .count()
    };
    eventually("the hogs are held", LIMIT, || async {
        let hogs = in_sandbox("echo hogging");
        let agent = in_sandbox(&format!("sleep {n}"));
        (hogs == 0 && agent == 1).then_some(())
    })
    .await;
    client
        .stop(&stop_command(&command.run_id))
        .await
        .expect("stop");
    let ended = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped, "{}", ended.reason);
    none_left(&[format!("sleep {n}")], "the stop").await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

async fn host_pid_of(needle: &str) -> i32 {
    eventually(&format!("{needle} runs"), LIMIT, || async {
        processes_with_cmdline(needle).first().copied()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_freezes_a_detached_process_and_resume_thaws_it() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let spawner = env.start_spawner().await;
    let client: Client = env.client().await;

    let n = unique_secs();
    let script = format!("setsid sleep {n} >/dev/null 2>&1 & echo detached");
    let command = env.kept(&["sh", "-c", &script]);
    let run_id = command.run_id.clone();
    client.start_run(&command).await.expect("start");
    idle_after(&client, &run_id, 1).await;
    let pid = host_pid_of(&format!("sleep {n}")).await;
    assert!(is_alive(pid) && !is_paused(pid), "it runs between turns");

    session(
        &client,
        &run_id,
        corral_proto::v1::session_command::Action::Pause,
    )
    .await;
    released(&client, &run_id, RunState::Paused).await;
    assert!(is_paused(pid), "pause froze the detached process");

    session(
        &client,
        &run_id,
        corral_proto::v1::session_command::Action::Resume,
    )
    .await;
    released(&client, &run_id, RunState::Idle).await;
    assert!(is_alive(pid) && !is_paused(pid), "resume thawed it");

    client.stop(&stop_command(&run_id)).await.expect("stop");
    env.wait_terminal(&client, &run_id, LIMIT).await;
    none_left(&[format!("sleep {n}")], "the stop").await;

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawner_that_cannot_isolate_refuses_to_start_and_names_the_setting() {
    let env = TestEnv::new().await;
    // Not root: no namespaces with an unprivileged agent user.
    let home = env.shared.join("unprivileged-home");
    let output = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(corral_tests::corral_bin())
        .args(["serve", "spawner"])
        .env("NATS_URL", &env.nats_url)
        .env("CORRAL_SUBJECT_PREFIX", &env.prefix)
        .env("CORRAL_HOME", &home)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIMIT, output)
        .await
        .expect("the spawner should exit at once")
        .expect("setpriv runs");
    assert!(!output.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("local.isolation: none"),
        "the error names the setting: {stderr}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unisolated_run_says_so_in_its_record() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.spawner_config();
    config.local.isolation = corral_provider::Isolation::None;
    let spawner = env.start_spawner_with(config).await;
    let client = env.client().await;

    let command = env.command(&["sh", "-c", "echo plain"]);
    client.start_run(&command).await.expect("submit");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let labels = &run.spec.as_ref().expect("spec").labels;
    assert_eq!(
        labels.get("corral.isolation").map(String::as_str),
        Some("none"),
        "{labels:?}"
    );
    assert_eq!(env.output(&command.run_id).await, ["plain"]);

    spawner.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}
