//! The E2B provider against the E2B emulator: real processes behind a real
//! HTTP API, with faults injected.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use corral_emulator::E2bEmulator;
use corral_provider::{
    CreateSpec, E2bConfig, E2bProvider, ExecSpec, ExitStatus, Health, KillOutcome, LABEL_CREATE,
    LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, LocalProvider, OutputLine, OutputStream, Provider,
    ProviderError,
};
use tempfile::TempDir;

const SIGKILL: i32 = 9;

/// Fields drop in order: the emulator (killing leftovers) before the home.
struct Harness {
    emulator: E2bEmulator,
    provider: E2bProvider,
    _home: TempDir,
}

async fn harness() -> Harness {
    let home = tempfile::tempdir().expect("temp home");
    let emulator = E2bEmulator::start(home.path())
        .await
        .expect("emulator starts");
    let provider = E2bProvider::new(config(&emulator)).expect("provider");
    Harness {
        emulator,
        provider,
        _home: home,
    }
}

fn config(emulator: &E2bEmulator) -> E2bConfig {
    E2bConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        envd_url: emulator.envd_url(),
        ..E2bConfig::default()
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
async fn run(provider: &E2bProvider, id: &str, spec: &ExecSpec) -> (Vec<OutputLine>, ExitStatus) {
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
    assert!(
        lines.contains(&line(OutputStream::Stderr, "err")),
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
        lines
            .iter()
            .any(|l| l.stream == OutputStream::Stderr && l.line.contains("/no/such/agent")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn sandboxes_are_created_secure_and_commands_get_no_stdin() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    assert!(
        h.emulator.is_secure(&sandbox.id),
        "created with secure: true"
    );
    // envd wants the token: a request without it is refused.
    let refused = reqwest::Client::new()
        .post(format!(
            "{}/envd/{}/process.Process/Start",
            h.emulator.url(),
            sandbox.id
        ))
        .header("Content-Type", "application/connect+json")
        .body(vec![0u8, 0, 0, 0, 2, b'{', b'}'])
        .send()
        .await
        .expect("the emulator answers");
    assert_eq!(refused.status(), 401);
    // A command that reads stdin ends: it reads nothing.
    let (_, status) = run(&h.provider, &sandbox.id, &argv(&["cat"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(
        h.emulator.open_stdin_starts(),
        0,
        "every start sent stdin: false"
    );
}

#[tokio::test]
async fn a_gone_sandbox_is_recognised_from_the_proxys_answer() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.emulator.expire(&sandbox.id);
    let started = Instant::now();
    let err = h.provider.exec(&sandbox.id, &argv(&["true"])).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    // Not retried as an outage (the backoff alone takes seconds).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn list_finds_sandboxes_by_label_across_pages() {
    let h = harness().await;
    let first = h.provider.create(&spec("r1")).await.expect("create r1");
    let second = h.provider.create(&spec("r2")).await.expect("create r2");
    h.emulator.set_page_size(1);

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
    assert_eq!(health, Health::Gone("e2b: sandbox not found (404)".into()));
    let err = h.provider.resume(&sandbox.id).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    assert!(!h.emulator.sandbox_ids().contains(&sandbox.id));
    eventually("the expired sandbox's processes survived", || {
        LocalProvider::live_processes(&sandbox.id).is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_sandbox_expires_by_itself_once_its_timeout_passes() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.provider
        .set_timeout(&sandbox.id, 1)
        .await
        .expect("set timeout");
    assert!(h.emulator.sandbox_ids().contains(&sandbox.id));
    eventually("the sandbox outlived its timeout", || {
        !h.emulator.sandbox_ids().contains(&sandbox.id)
    })
    .await;
    assert!(matches!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Gone(_)
    ));
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
    // The adopted sandbox runs commands (its envd token came with the list).
    let (_, status) = run(&h.provider, &learned.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    h.provider.kill(&learned.id).await.expect("kill");
    assert!(h.emulator.sandbox_ids().is_empty());
}

#[tokio::test]
async fn terminate_escalates_to_sigkill_when_sigterm_is_ignored() {
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
    let (status, escalated) = tokio::time::timeout(
        Duration::from_secs(5),
        exec.process.terminate(Duration::from_millis(300)),
    )
    .await
    .expect("terminate never finished");
    assert!(escalated, "SIGTERM should have been ignored");
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
}

#[tokio::test]
async fn another_provider_instance_can_run_commands_in_a_sandbox_it_did_not_create() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let other = E2bProvider::new(config(&h.emulator)).expect("second provider");
    let (lines, status) = run(&other, &sandbox.id, &argv(&["echo", "from afar"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "from afar")]);
    assert_eq!(status, ExitStatus::Code(0));
}

#[tokio::test]
async fn a_provider_without_an_api_key_is_refused_at_construction() {
    let err = E2bProvider::new(E2bConfig::default()).err();
    assert!(matches!(err, Some(ProviderError::Invalid(_))), "{err:?}");
}

/// Pids of live processes whose command line is exactly `needle`'s words.
fn processes_running(needle: &[&str]) -> Vec<i32> {
    let wanted: Vec<u8> = needle
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_state(*pid).is_some_and(|state| state != 'Z'))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok() == Some(wanted.clone()))
        .collect()
}

/// envd's `SendSignal` reaches one pid (the emulator's does as envd's
/// does): the client signals the command's whole group instead.
#[tokio::test]
async fn terminate_ends_every_process_the_command_started() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let child = ["sleep", "3101"];
    let mut exec = h
        .provider
        .exec(
            &sandbox.id,
            &argv(&["sh", "-c", "sleep 3101 & echo ready; wait"]),
        )
        .await
        .expect("exec");
    assert_eq!(
        exec.output.recv().await.map(|l| l.line),
        Some("ready".into())
    );
    assert_eq!(processes_running(&child).len(), 1, "the child never ran");
    let (_, escalated) = tokio::time::timeout(
        Duration::from_secs(10),
        exec.process.terminate(Duration::from_secs(3)),
    )
    .await
    .expect("terminate never finished");
    assert!(!escalated, "the group's SIGTERM should have ended it");
    eventually("the command's child survived its SIGTERM", || {
        processes_running(&child).is_empty()
    })
    .await;
    // Not the sandbox's end: it still runs commands.
    let (_, status) = run(&h.provider, &sandbox.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    h.provider.kill(&sandbox.id).await.expect("kill");
}

/// envd forwards no output after `SendSignal` SIGTERM; a command that says
/// goodbye on SIGTERM is still heard, and its exit code read.
#[tokio::test]
async fn a_command_winding_down_after_sigterm_is_still_heard() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut exec = h
        .provider
        .exec(
            &sandbox.id,
            &argv(&[
                "sh",
                "-c",
                "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
            ]),
        )
        .await
        .expect("exec");
    assert_eq!(
        exec.output.recv().await.map(|l| l.line),
        Some("ready".into())
    );
    let (status, escalated) = tokio::time::timeout(
        Duration::from_secs(10),
        exec.process.terminate(Duration::from_secs(5)),
    )
    .await
    .expect("terminate never finished");
    assert!(!escalated);
    assert_eq!(status, ExitStatus::Code(0));
    let mut rest = Vec::new();
    while let Some(line) = exec.output.recv().await {
        rest.push(line.line);
    }
    // The shell may also report its `sleep` ended by the group's SIGTERM.
    assert!(rest.contains(&"bye".to_owned()), "{rest:?}");
    h.provider.kill(&sandbox.id).await.expect("kill");
}

/// E2B unescapes the metadata filter twice after the query's own decoding.
#[tokio::test]
async fn a_label_value_with_reserved_characters_is_found() {
    let h = harness().await;
    let awkward = "a%b+c&d=e f/é";
    let mut wanted = spec("r1");
    wanted.labels.insert("corral.note".into(), awkward.into());
    let sandbox = h.provider.create(&wanted).await.expect("create");
    let mut other = spec("r2");
    other.labels.insert("corral.note".into(), "a".into());
    let decoy = h.provider.create(&other).await.expect("create");
    let filter = Labels::from([("corral.note".to_owned(), awkward.to_owned())]);
    let found: Vec<String> = h
        .provider
        .list(&filter)
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(found, vec![sandbox.id.clone()]);
    h.provider.kill(&sandbox.id).await.expect("kill");
    h.provider.kill(&decoy.id).await.expect("kill");
}

/// envd 0.4 and later run commands as the template's default user: the SDK
/// names none, and neither does corral.
#[tokio::test]
async fn no_user_is_named_to_envd_0_4() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (_, status) = run(&h.provider, &sandbox.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(h.emulator.user_starts(), 0);
    h.provider.kill(&sandbox.id).await.expect("kill");
}
