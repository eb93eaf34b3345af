//! The Daytona provider against the Daytona emulator: real processes behind
//! a real HTTP API, with faults injected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use corral_emulator::DaytonaEmulator;
use corral_provider::{
    CreateSpec, DaytonaConfig, DaytonaProvider, ExecSpec, ExitStatus, Health, KillOutcome,
    LABEL_CREATE, LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, LocalProvider, OutputLine, OutputStream,
    Provider, ProviderError,
};
use tempfile::TempDir;

const SIGKILL: i32 = 9;

/// Fields drop in order: the emulator (killing leftovers) before the home.
struct Harness {
    emulator: DaytonaEmulator,
    provider: DaytonaProvider,
    _home: TempDir,
}

async fn harness() -> Harness {
    let home = tempfile::tempdir().expect("temp home");
    let emulator = DaytonaEmulator::start(home.path())
        .await
        .expect("emulator starts");
    let provider = DaytonaProvider::new(config(&emulator)).expect("provider");
    Harness {
        emulator,
        provider,
        _home: home,
    }
}

fn config(emulator: &DaytonaEmulator) -> DaytonaConfig {
    DaytonaConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        ..DaytonaConfig::default()
    }
}

fn labels(run_id: &str) -> Labels {
    Labels::from([
        (LABEL_RUN_ID.to_owned(), run_id.to_owned()),
        (LABEL_DEPLOYMENT.to_owned(), "test".to_owned()),
    ])
}

fn spec(run_id: &str) -> CreateSpec {
    CreateSpec {
        run_id: run_id.into(),
        labels: labels(run_id),
        ..CreateSpec::default()
    }
}

fn argv(args: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
    }
}

fn line(stream: OutputStream, text: &str) -> OutputLine {
    OutputLine {
        stream,
        line: text.into(),
    }
}

/// Runs a command to its end: its lines and how it ended.
async fn run(
    provider: &DaytonaProvider,
    id: &str,
    spec: &ExecSpec,
) -> (Vec<OutputLine>, ExitStatus) {
    let mut exec = provider.exec(id, spec).await.expect("exec");
    let mut lines = Vec::new();
    while let Some(line) = exec.output.recv().await {
        lines.push(line);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command never reported its exit");
    (lines, status)
}

/// Polls `done` until it holds, failing with `what` after 5 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The state letter of /proc/<pid>/stat ('T' when stopped).
fn proc_state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].trim_start().chars().next()
}

fn all_stopped(sandbox_id: &str) -> bool {
    let pids = LocalProvider::live_processes(sandbox_id);
    !pids.is_empty() && pids.iter().all(|pid| proc_state(*pid) == Some('T'))
}

fn none_stopped(sandbox_id: &str) -> bool {
    let pids = LocalProvider::live_processes(sandbox_id);
    !pids.is_empty() && pids.iter().all(|pid| proc_state(*pid) != Some('T'))
}

#[tokio::test]
async fn a_command_streams_its_stdout_stderr_and_exit_code() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = run(
        &h.provider,
        &sandbox.id,
        &argv(&["sh", "-c", "echo hi; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(3));
    assert!(
        lines.contains(&line(OutputStream::Stdout, "hi")),
        "{lines:?}"
    );
    // Daytona's session log does not tell stderr from stdout.
    assert!(
        lines.contains(&line(OutputStream::Stdout, "err")),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    h.provider.kill(&sandbox.id).await.expect("kill");
}

#[tokio::test]
async fn the_command_gets_its_environment_and_a_last_line_without_newline() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut spec = argv(&["sh", "-c", "printf '%s' \"$GREETING\""]);
    spec.env.insert("GREETING".into(), "hello there".into());
    let (lines, status) = run(&h.provider, &sandbox.id, &spec).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(lines, vec![line(OutputStream::Stdout, "hello there")]);
}

#[tokio::test]
async fn a_missing_program_exits_127_with_the_shells_message() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = run(&h.provider, &sandbox.id, &argv(&["/no/such/agent"])).await;
    assert_eq!(status, ExitStatus::Code(127));
    assert!(
        lines.iter().any(|l| l.line.contains("/no/such/agent")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn list_finds_sandboxes_by_label() {
    let h = harness().await;
    let first = h.provider.create(&spec("r1")).await.expect("create r1");
    let second = h.provider.create(&spec("r2")).await.expect("create r2");

    let by_run = h.provider.list(&labels("r1")).await.expect("list r1");
    assert_eq!(by_run.len(), 1, "{by_run:?}");
    assert_eq!(by_run[0].id, first.id);
    let mut listed_labels = by_run[0].labels.clone();
    assert!(
        listed_labels.remove(LABEL_CREATE).is_some(),
        "each create is labelled with its own id"
    );
    assert_eq!(listed_labels, labels("r1"));
    assert!(by_run[0].created_at_ms > 0);

    let other = Labels::from([(LABEL_RUN_ID.to_owned(), "r3".to_owned())]);
    assert!(h.provider.list(&other).await.expect("list r3").is_empty());

    let deployment = Labels::from([(LABEL_DEPLOYMENT.to_owned(), "test".to_owned())]);
    let mut ids: Vec<String> = h
        .provider
        .list(&deployment)
        .await
        .expect("list deployment")
        .into_iter()
        .map(|s| s.id)
        .collect();
    ids.sort();
    let mut expected = vec![first.id, second.id];
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn pause_stops_the_processes_and_resume_continues_them() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut exec = h
        .provider
        .exec(&sandbox.id, &argv(&["sh", "-c", "echo ready; sleep 30"]))
        .await
        .expect("exec");
    assert_eq!(
        exec.output.recv().await.map(|l| l.line),
        Some("ready".into())
    );

    h.provider.pause(&sandbox.id).await.expect("pause");
    eventually("the processes never stopped", || all_stopped(&sandbox.id)).await;
    h.provider
        .pause(&sandbox.id)
        .await
        .expect("pausing again is fine");
    assert_eq!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Healthy
    );
    let listed = h.provider.list(&labels("r1")).await.expect("list");
    assert!(listed[0].paused, "{listed:?}");

    h.provider.resume(&sandbox.id).await.expect("resume");
    eventually("the processes never continued", || {
        none_stopped(&sandbox.id)
    })
    .await;
    assert!(!h.provider.list(&labels("r1")).await.expect("list")[0].paused);
    assert_eq!(
        exec.process.status(),
        None,
        "the command ended during the pause"
    );
    h.provider.kill(&sandbox.id).await.expect("kill");
}

#[tokio::test]
async fn a_killed_sandbox_is_gone_and_killing_it_again_is_fine() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let exec = h
        .provider
        .exec(&sandbox.id, &argv(&["sleep", "30"]))
        .await
        .expect("exec");
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
    assert!(
        LocalProvider::live_processes(&sandbox.id).is_empty(),
        "processes survived"
    );
    let status = tokio::time::timeout(Duration::from_secs(5), exec.process.wait()).await;
    assert_eq!(
        status.expect("the command never ended"),
        ExitStatus::Signal(SIGKILL)
    );
    assert!(matches!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Gone(_)
    ));
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill again"),
        KillOutcome::AlreadyGone
    );
    let err = h.provider.exec(&sandbox.id, &argv(&["true"])).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
}

#[tokio::test]
async fn an_expired_sandbox_is_gone_and_cannot_be_resumed() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.provider
        .exec(&sandbox.id, &argv(&["sleep", "30"]))
        .await
        .expect("exec");
    h.emulator.expire(&sandbox.id);

    let health = h.provider.probe(&sandbox.id).await.expect("probe");
    assert_eq!(health, Health::Gone("daytona: sandbox not found".into()));
    let err = h.provider.resume(&sandbox.id).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    assert!(!h.emulator.sandbox_ids().contains(&sandbox.id));
    eventually("the expired sandbox's processes survived", || {
        LocalProvider::live_processes(&sandbox.id).is_empty()
    })
    .await;
}

#[tokio::test]
async fn failures_and_rate_limits_are_retried() {
    let h = harness().await;
    h.emulator.faults().fail_next(2, 503);
    let sandbox = h
        .provider
        .create(&spec("r1"))
        .await
        .expect("create despite 503s");
    assert_eq!(h.emulator.created(), 1);

    h.emulator.faults().rate_limit_next(2);
    let (lines, status) = run(&h.provider, &sandbox.id, &argv(&["echo", "ok"])).await;
    assert_eq!((lines.len(), status), (1, ExitStatus::Code(0)));

    h.emulator.faults().fail_next(2, 502);
    assert_eq!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Healthy
    );
    h.emulator.faults().rate_limit_next(2);
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
}

#[tokio::test]
async fn an_outage_longer_than_the_backoff_is_a_transient_error() {
    let h = harness().await;
    h.emulator.faults().fail_next(100, 503);
    let err = h.provider.create(&spec("r1")).await.err();
    assert!(matches!(err, Some(ProviderError::Transient(_))), "{err:?}");
    assert_eq!(h.emulator.created(), 0);
    h.emulator.faults().clear();
    h.provider
        .create(&spec("r1"))
        .await
        .expect("create after the outage");
}

#[tokio::test]
async fn a_slow_api_still_answers() {
    let h = harness().await;
    h.emulator.faults().delay(Duration::from_millis(200));
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = run(&h.provider, &sandbox.id, &argv(&["echo", "slow"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "slow")]);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_adopted_not_made_twice() {
    let h = harness().await;
    h.emulator.faults().lose_next_creates(1);
    let learned = h
        .provider
        .create(&spec("r1"))
        .await
        .expect("the create, its answer lost");
    assert_eq!(h.emulator.created(), 1, "one sandbox, not a second");
    let listed = h.provider.list(&labels("r1")).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, learned.id);
    h.provider.kill(&learned.id).await.expect("kill");
    assert!(h.emulator.sandbox_ids().is_empty());
}

#[tokio::test]
async fn a_create_slower_than_the_clients_timeout_results_in_exactly_one_sandbox() {
    let h = harness().await;
    let provider = DaytonaProvider::new(DaytonaConfig {
        create_timeout_secs: 1,
        ..config(&h.emulator)
    })
    .expect("provider");
    // Daytona holds a create until the sandbox runs: here past the timeout.
    h.emulator.hold_creates(Duration::from_secs(3));
    let sandbox = provider.create(&spec("r1")).await.expect("create");
    assert_eq!(h.emulator.created(), 1, "exactly one sandbox");
    assert_eq!(h.emulator.sandbox_ids(), vec![sandbox.id.clone()]);
    let (lines, status) = run(&provider, &sandbox.id, &argv(&["echo", "here"])).await;
    assert_eq!((lines.len(), status), (1, ExitStatus::Code(0)));
}

#[tokio::test]
async fn a_create_sends_no_resources_and_asks_for_auto_delete() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    assert_eq!(h.emulator.auto_delete_minutes(&sandbox.id), Some(24 * 60));
    // What the client must not send: Daytona refuses it.
    let refused = reqwest::Client::new()
        .post(format!("{}/sandbox", h.emulator.url()))
        .bearer_auth("test-key")
        .json(&serde_json::json!({ "snapshot": "daytona-small", "cpu": 2 }))
        .send()
        .await
        .expect("the emulator answers");
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(
        body["message"],
        "Cannot specify Sandbox resources when using a snapshot"
    );
    // A snapshot nobody registered is refused, by name.
    let provider = DaytonaProvider::new(DaytonaConfig {
        snapshot: "daytonaio/sandbox".into(),
        ..config(&h.emulator)
    })
    .expect("provider");
    let err = provider
        .create(&spec("r2"))
        .await
        .expect_err("unknown snapshot");
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("Snapshot daytonaio/sandbox not found")),
        "{err:?}"
    );
}

#[tokio::test]
async fn list_reads_every_page() {
    let h = harness().await;
    h.emulator.set_page_size(2);
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(
            h.provider
                .create(&spec(&format!("p{i}")))
                .await
                .expect("create")
                .id,
        );
    }
    let deployment = Labels::from([(LABEL_DEPLOYMENT.to_owned(), "test".to_owned())]);
    let mut listed: Vec<String> = h
        .provider
        .list(&deployment)
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.id)
        .collect();
    listed.sort();
    created.sort();
    assert_eq!(listed, created);
}

#[tokio::test]
async fn a_resumed_sandbox_runs_commands_at_once() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.provider.pause(&sandbox.id).await.expect("pause");
    // Stopped: the toolbox refuses, and that is no "invalid request".
    let err = h.provider.exec(&sandbox.id, &argv(&["true"])).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    // Start answers while Daytona is still starting it: resume waits.
    h.provider.resume(&sandbox.id).await.expect("resume");
    let (_, status) = run(&h.provider, &sandbox.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    h.provider
        .resume(&sandbox.id)
        .await
        .expect("resuming again is fine");
}

/// Daytona cannot signal one command: interrupt already deletes the
/// session, so the command ends by SIGKILL whether or not the grace ran out.
#[tokio::test]
async fn terminate_ends_a_command_that_ignores_sigterm() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut exec = h
        .provider
        .exec(
            &sandbox.id,
            &argv(&["sh", "-c", "trap '' TERM; echo ready; sleep 30"]),
        )
        .await
        .expect("exec");
    assert_eq!(
        exec.output.recv().await.map(|l| l.line),
        Some("ready".into())
    );
    let started = Instant::now();
    let (status, _escalated) = tokio::time::timeout(
        Duration::from_secs(5),
        exec.process.terminate(Duration::from_millis(300)),
    )
    .await
    .expect("terminate never finished");
    assert_eq!(status, ExitStatus::Signal(SIGKILL));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    eventually("the command's processes survived", || {
        LocalProvider::live_processes(&sandbox.id).is_empty()
    })
    .await;
    // The sandbox itself lives on.
    assert_eq!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Healthy
    );
}

#[tokio::test]
async fn another_provider_instance_can_run_commands_in_a_sandbox_it_did_not_create() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let other = DaytonaProvider::new(config(&h.emulator)).expect("second provider");
    let (lines, status) = run(&other, &sandbox.id, &argv(&["echo", "from afar"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "from afar")]);
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn a_provider_without_an_api_key_is_refused_at_construction() {
    let err = DaytonaProvider::new(DaytonaConfig::default()).err();
    assert!(matches!(err, Some(ProviderError::Invalid(_))), "{err:?}");
}

/// The toolbox answers a log as it is (it follows one only over a
/// WebSocket): output that comes after a quiet stretch is read by a later
/// poll, never lost with a stream that ended early.
#[tokio::test]
async fn output_after_a_quiet_stretch_still_arrives() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = run(
        &h.provider,
        &sandbox.id,
        &argv(&[
            "sh",
            "-c",
            "echo first; sleep 2; echo second; sleep 1; printf third",
        ]),
    )
    .await;
    assert_eq!(status, ExitStatus::Code(0));
    let lines: Vec<String> = lines.into_iter().map(|l| l.line).collect();
    assert_eq!(lines, ["first", "second", "third"]);
    h.provider.kill(&sandbox.id).await.expect("kill");
}

/// A sandbox deleted under a running command: the toolbox proxy no longer
/// finds it (400), and the command is reported ended, not polled for ever.
#[tokio::test]
async fn a_command_whose_sandbox_is_deleted_ends() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut exec = h
        .provider
        .exec(&sandbox.id, &argv(&["sh", "-c", "echo ready; sleep 30"]))
        .await
        .expect("exec");
    assert_eq!(
        exec.output.recv().await.map(|l| l.line),
        Some("ready".into())
    );
    h.provider.kill(&sandbox.id).await.expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command was never reported ended");
    assert_eq!(status, ExitStatus::Signal(SIGKILL));
    let err = h.provider.exec(&sandbox.id, &argv(&["true"])).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
}
