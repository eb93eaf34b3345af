//! The provider contract, written once and held against every provider:
//! the local one (namespaces, as deployed) and E2B and Daytona against
//! their emulators (real processes behind a real HTTP API, with faults
//! injected). [`contract_tests!`] stamps out one test per behaviour and
//! provider, so a failure names both (`daytona::pause_stops_...`).
//!
//! Where providers legitimately differ the harness says so in
//! [`Capabilities`](harness::Capabilities), and the test asserts each
//! variant exactly. What only a remote API has (faults, rate limits,
//! expiry, API keys) runs for E2B and Daytona only; what only one service
//! does stays in `e2b.rs` and `daytona.rs`.

#[path = "contract/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use corral_provider::{
    ExitStatus, Health, KillOutcome, LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, OutputStream,
    ProviderError,
};

use harness::{
    Harness, MissingProgram, SIGKILL, argv, daytona_harness, e2b_harness, eventually, labels, line,
    local_harness, run_on, spec,
};

/// One `#[tokio::test]` per listed behaviour, each on a fresh harness.
macro_rules! stamp {
    ($harness:ident: $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                super::$test(super::$harness().await).await;
            }
        )+
    };
}

/// What every provider does.
macro_rules! common_tests {
    ($harness:ident) => {
        stamp!($harness:
            a_command_streams_its_stdout_stderr_and_exit_code,
            the_command_gets_its_environment_and_a_last_line_without_newline,
            a_missing_program_is_reported_by_name,
            a_command_that_reads_stdin_reads_nothing,
            list_finds_sandboxes_by_label,
            a_label_value_with_reserved_characters_is_found,
            pause_stops_the_processes_and_resume_continues_them,
            a_resumed_sandbox_runs_commands_at_once,
            a_killed_sandbox_is_gone_and_killing_it_again_is_fine,
            terminate_ends_a_command_that_ignores_sigterm,
            terminate_ends_every_process_the_command_started,
            a_command_winding_down_after_sigterm_is_heard_where_sigterm_arrives,
            another_provider_instance_can_run_commands_in_a_sandbox_it_did_not_create,
        );
    };
}

/// What a provider behind a remote API does: it can fail, be slow, lose
/// answers, expire sandboxes and want a key.
macro_rules! remote_tests {
    ($harness:ident) => {
        stamp!($harness:
            an_expired_sandbox_is_gone_and_cannot_be_resumed,
            a_command_in_an_expired_sandbox_is_refused_at_once,
            failures_and_rate_limits_are_retried,
            an_outage_longer_than_the_backoff_is_a_transient_error,
            a_slow_api_still_answers,
            a_create_whose_answer_was_lost_is_adopted_not_made_twice,
            a_provider_without_an_api_key_is_refused_at_construction,
        );
    };
}

/// A module of tests named after the provider: the common ones and the
/// extra groups listed.
macro_rules! contract_tests {
    ($provider:ident, $harness:ident $(, $extra:ident)*) => {
        mod $provider {
            common_tests!($harness);
            $($extra!($harness);)*
        }
    };
}

contract_tests!(local, local_harness);
contract_tests!(e2b, e2b_harness, remote_tests);
contract_tests!(daytona, daytona_harness, remote_tests);

/// Runs `sh -c script` and waits for its first line, `ready`.
async fn started(h: &Harness, sandbox_id: &str, script: &str) -> corral_provider::Execution {
    let mut exec = h
        .provider
        .exec(sandbox_id, &argv(&["sh", "-c", script]))
        .await
        .expect("exec");
    let first = tokio::time::timeout(Duration::from_secs(10), exec.output.recv())
        .await
        .expect("the command never said it was ready");
    assert_eq!(first.map(|l| l.line), Some("ready".into()));
    exec
}

fn sorted(mut pids: Vec<i32>) -> Vec<i32> {
    pids.sort_unstable();
    pids
}

// ---- every provider ----

async fn a_command_streams_its_stdout_stderr_and_exit_code(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = h
        .run(
            &sandbox.id,
            &argv(&["sh", "-c", "echo hi; echo err >&2; exit 3"]),
        )
        .await;
    assert_eq!(status, ExitStatus::Code(3));
    assert!(
        lines.contains(&line(OutputStream::Stdout, "hi")),
        "{lines:?}"
    );
    let stderr = if h.caps.separates_stderr {
        OutputStream::Stderr
    } else {
        OutputStream::Stdout
    };
    assert!(lines.contains(&line(stderr, "err")), "{lines:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    h.provider.kill(&sandbox.id).await.expect("kill");
}

async fn the_command_gets_its_environment_and_a_last_line_without_newline(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut spec = argv(&["sh", "-c", "printf '%s' \"$GREETING\""]);
    spec.env.insert("GREETING".into(), "hello there".into());
    let (lines, status) = h.run(&sandbox.id, &spec).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(lines, vec![line(OutputStream::Stdout, "hello there")]);
}

async fn a_missing_program_is_reported_by_name(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let missing = argv(&["/no/such/agent"]);
    match h.caps.missing_program {
        MissingProgram::Exits127 => {
            let (lines, status) = h.run(&sandbox.id, &missing).await;
            assert_eq!(status, ExitStatus::Code(127));
            let stderr = if h.caps.separates_stderr {
                OutputStream::Stderr
            } else {
                OutputStream::Stdout
            };
            assert!(
                lines
                    .iter()
                    .any(|l| l.stream == stderr && l.line.contains("/no/such/agent")),
                "{lines:?}"
            );
        }
        MissingProgram::RefusedAtExec => {
            let err = h.provider.exec(&sandbox.id, &missing).await.err();
            assert!(
                matches!(&err, Some(ProviderError::Invalid(m)) if m.contains("/no/such/agent")),
                "{err:?}"
            );
        }
    }
}

async fn a_command_that_reads_stdin_reads_nothing(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = h.run(&sandbox.id, &argv(&["cat"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    assert!(lines.is_empty(), "{lines:?}");
}

/// Remote lists are read one sandbox a page: every page counts.
async fn list_finds_sandboxes_by_label(h: Harness) {
    let first = h.provider.create(&spec("r1")).await.expect("create r1");
    let second = h.provider.create(&spec("r2")).await.expect("create r2");
    if let Some(emulator) = h.emulator() {
        emulator.set_page_size(1);
    }

    let by_run = h.provider.list(&labels("r1")).await.expect("list r1");
    assert_eq!(by_run.len(), 1, "{by_run:?}");
    assert_eq!(by_run[0].id, first.id);
    let mut listed_labels = by_run[0].labels.clone();
    for added in h.caps.added_labels {
        assert!(
            listed_labels.remove(*added).is_some(),
            "every sandbox is labelled {added}: {:?}",
            by_run[0].labels
        );
    }
    assert_eq!(listed_labels, labels("r1"));
    assert!(by_run[0].created_at_ms > 0);
    assert!(!by_run[0].paused);

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

/// A label filter travels intact however the API encodes it (E2B, for
/// one, unescapes its metadata filter twice after the query's decoding).
async fn a_label_value_with_reserved_characters_is_found(h: Harness) {
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

async fn pause_stops_the_processes_and_resume_continues_them(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let exec = started(&h, &sandbox.id, "echo ready; sleep 30").await;
    let paused = |id: &str| {
        let pids = h.processes(id);
        !pids.is_empty()
            && pids
                .iter()
                .all(|pid| corral_provider::local::is_paused(*pid))
    };
    let running = |id: &str| {
        let pids = h.processes(id);
        !pids.is_empty()
            && pids
                .iter()
                .all(|pid| !corral_provider::local::is_paused(*pid))
    };

    h.provider.pause(&sandbox.id).await.expect("pause");
    eventually("the processes never stopped", || paused(&sandbox.id)).await;
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
    eventually("the processes never continued", || running(&sandbox.id)).await;
    assert!(!h.provider.list(&labels("r1")).await.expect("list")[0].paused);
    assert_eq!(
        exec.process.status(),
        None,
        "the command ended during the pause"
    );
    h.provider.kill(&sandbox.id).await.expect("kill");
}

/// Resume returns once the sandbox runs again (Daytona's start answers
/// while it is still starting), and resuming a running one is fine.
async fn a_resumed_sandbox_runs_commands_at_once(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.provider.pause(&sandbox.id).await.expect("pause");
    h.provider.resume(&sandbox.id).await.expect("resume");
    let (lines, status) = h.run(&sandbox.id, &argv(&["echo", "back"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "back")]);
    assert_eq!(status, ExitStatus::Code(0));
    h.provider
        .resume(&sandbox.id)
        .await
        .expect("resuming again is fine");
    h.provider.kill(&sandbox.id).await.expect("kill");
}

/// A command running when its sandbox is killed is reported ended (not
/// polled for ever), and the sandbox is gone for every operation.
async fn a_killed_sandbox_is_gone_and_killing_it_again_is_fine(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let exec = started(&h, &sandbox.id, "echo ready; sleep 30").await;
    let before = h.processes(&sandbox.id);
    assert!(!before.is_empty(), "the sandbox runs nothing");
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
    let survivors: Vec<i32> = before
        .into_iter()
        .filter(|pid| corral_provider::local::is_alive(*pid))
        .collect();
    assert!(survivors.is_empty(), "processes survived: {survivors:?}");
    assert!(h.processes(&sandbox.id).is_empty(), "processes survived");
    let status = tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command was never reported ended");
    assert_eq!(status, ExitStatus::Signal(SIGKILL));
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
    assert!(
        h.provider
            .list(&labels("r1"))
            .await
            .expect("list")
            .is_empty()
    );
}

/// SIGTERM ignored: SIGKILL after the grace. Where SIGTERM cannot be sent
/// (Daytona) the command is SIGKILLed at once. Either way the command ends
/// promptly and the sandbox lives on.
async fn terminate_ends_a_command_that_ignores_sigterm(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let idle = sorted(h.processes(&sandbox.id));
    let exec = started(&h, &sandbox.id, "trap '' TERM; echo ready; sleep 30").await;
    let started_at = Instant::now();
    let (status, escalated) = tokio::time::timeout(
        Duration::from_secs(5),
        exec.process.terminate(Duration::from_millis(300)),
    )
    .await
    .expect("terminate never finished");
    if h.caps.delivers_sigterm {
        assert!(escalated, "SIGTERM should have been ignored");
    }
    assert_eq!(status, ExitStatus::Signal(SIGKILL));
    assert!(
        started_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        started_at.elapsed()
    );
    eventually("the command's processes survived", || {
        sorted(h.processes(&sandbox.id)) == idle
    })
    .await;
    assert_eq!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Healthy
    );
}

/// The whole command ends, not only its first process (E2B's envd signals
/// one pid: the client signals the command's group instead).
async fn terminate_ends_every_process_the_command_started(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let child = ["sleep", "3101"];
    let exec = started(&h, &sandbox.id, "sleep 3101 & echo ready; wait").await;
    // `ready` may come before the forked shell has exec'd `sleep`.
    eventually("the child never ran", || {
        h.processes_running(&sandbox.id, &child).len() == 1
    })
    .await;
    let (_, escalated) = tokio::time::timeout(
        Duration::from_secs(10),
        exec.process.terminate(Duration::from_secs(3)),
    )
    .await
    .expect("terminate never finished");
    if h.caps.delivers_sigterm {
        assert!(!escalated, "the group's SIGTERM should have ended it");
    }
    eventually("the command's child survived its end", || {
        h.processes_running(&sandbox.id, &child).is_empty()
    })
    .await;
    // Not the sandbox's end: it still runs commands.
    let (_, status) = h.run(&sandbox.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    h.provider.kill(&sandbox.id).await.expect("kill");
}

/// Where SIGTERM arrives, a command saying goodbye on it is still heard
/// and its exit code read (envd, for one, forwards no output after its
/// `SendSignal`). Where it cannot be sent (Daytona), the command is
/// SIGKILLed and has no last word.
async fn a_command_winding_down_after_sigterm_is_heard_where_sigterm_arrives(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let mut exec = started(
        &h,
        &sandbox.id,
        "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
    )
    .await;
    let (status, escalated) = tokio::time::timeout(
        Duration::from_secs(10),
        exec.process.terminate(Duration::from_secs(5)),
    )
    .await
    .expect("terminate never finished");
    assert!(!escalated, "the command ended within the grace");
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = Vec::new();
        while let Some(line) = exec.output.recv().await {
            rest.push(line.line);
        }
        rest
    })
    .await
    .expect("the output never ended");
    if h.caps.delivers_sigterm {
        assert_eq!(status, ExitStatus::Code(0));
        // The shell may also report its `sleep` ended by the group's SIGTERM.
        assert!(rest.contains(&"bye".to_owned()), "{rest:?}");
    } else {
        assert_eq!(status, ExitStatus::Signal(SIGKILL));
        assert!(!rest.contains(&"bye".to_owned()), "{rest:?}");
    }
    h.provider.kill(&sandbox.id).await.expect("kill");
}

async fn another_provider_instance_can_run_commands_in_a_sandbox_it_did_not_create(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let other = h.another_provider();
    let (lines, status) = run_on(&*other, &sandbox.id, &argv(&["echo", "from afar"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "from afar")]);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(
        other.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
}

// ---- remote providers ----

async fn an_expired_sandbox_is_gone_and_cannot_be_resumed(h: Harness) {
    let emulator = h.remote();
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.provider
        .exec(&sandbox.id, &argv(&["sleep", "30"]))
        .await
        .expect("exec");
    emulator.expire(&sandbox.id);

    let health = h.provider.probe(&sandbox.id).await.expect("probe");
    assert_eq!(health, Health::Gone(h.expired_reason().into()));
    let err = h.provider.resume(&sandbox.id).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    assert!(!emulator.sandbox_ids().contains(&sandbox.id));
    eventually("the expired sandbox's processes survived", || {
        h.processes(&sandbox.id).is_empty()
    })
    .await;
}

/// The API's "not found" for a command's sandbox is told from an outage:
/// not retried (the backoff alone takes seconds).
async fn a_command_in_an_expired_sandbox_is_refused_at_once(h: Harness) {
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.remote().expire(&sandbox.id);
    let started_at = Instant::now();
    let err = h.provider.exec(&sandbox.id, &argv(&["true"])).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    assert!(
        started_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        started_at.elapsed()
    );
}

async fn failures_and_rate_limits_are_retried(h: Harness) {
    let emulator = h.remote();
    emulator.faults().fail_next(2, 503);
    let sandbox = h
        .provider
        .create(&spec("r1"))
        .await
        .expect("create despite 503s");
    assert_eq!(emulator.created(), 1);

    emulator.faults().rate_limit_next(2);
    let (lines, status) = h.run(&sandbox.id, &argv(&["echo", "ok"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "ok")]);
    assert_eq!(status, ExitStatus::Code(0));

    emulator.faults().fail_next(2, 502);
    assert_eq!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Healthy
    );
    emulator.faults().rate_limit_next(2);
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
}

async fn an_outage_longer_than_the_backoff_is_a_transient_error(h: Harness) {
    let emulator = h.remote();
    emulator.faults().fail_next(100, 503);
    let err = h.provider.create(&spec("r1")).await.err();
    assert!(matches!(err, Some(ProviderError::Transient(_))), "{err:?}");
    assert_eq!(emulator.created(), 0);
    emulator.faults().clear();
    h.provider
        .create(&spec("r1"))
        .await
        .expect("create after the outage");
}

async fn a_slow_api_still_answers(h: Harness) {
    h.remote().faults().delay(Duration::from_millis(200));
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    let (lines, status) = h.run(&sandbox.id, &argv(&["echo", "slow"])).await;
    assert_eq!(lines, vec![line(OutputStream::Stdout, "slow")]);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(
        h.provider.kill(&sandbox.id).await.expect("kill"),
        KillOutcome::Killed
    );
}

async fn a_create_whose_answer_was_lost_is_adopted_not_made_twice(h: Harness) {
    let emulator = h.remote();
    emulator.faults().lose_next_creates(1);
    let learned = h
        .provider
        .create(&spec("r1"))
        .await
        .expect("the create, its answer lost");
    assert_eq!(emulator.created(), 1, "one sandbox, not a second");
    let listed = h.provider.list(&labels("r1")).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, learned.id);
    // The adopted sandbox runs commands (E2B's envd token came with the list).
    let (_, status) = h.run(&learned.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
    h.provider.kill(&learned.id).await.expect("kill");
    assert!(emulator.sandbox_ids().is_empty());
}

async fn a_provider_without_an_api_key_is_refused_at_construction(h: Harness) {
    let err = h.without_api_key().err();
    assert!(matches!(err, Some(ProviderError::Invalid(_))), "{err:?}");
}
