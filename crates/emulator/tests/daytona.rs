//! What only Daytona does, against the Daytona emulator: creates held
//! until the sandbox runs, the create body it accepts, auto-delete, paged
//! lists, stopped sandboxes, logs read by polling. What every provider
//! does is in `contract.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_emulator::DaytonaEmulator;
use corral_provider::{
    CreateSpec, DaytonaConfig, DaytonaProvider, ExecSpec, ExitStatus, LABEL_DEPLOYMENT,
    LABEL_RUN_ID, Labels, Provider, ProviderError,
};
use tempfile::TempDir;

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

fn spec(run_id: &str) -> CreateSpec {
    CreateSpec {
        run_id: run_id.into(),
        labels: Labels::from([
            (LABEL_RUN_ID.to_owned(), run_id.to_owned()),
            (LABEL_DEPLOYMENT.to_owned(), "test".to_owned()),
        ]),
        ..CreateSpec::default()
    }
}

fn argv(args: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
    }
}

/// Runs a command to its end: its lines and how it ended.
async fn run(provider: &DaytonaProvider, id: &str, spec: &ExecSpec) -> (Vec<String>, ExitStatus) {
    let mut exec = provider.exec(id, spec).await.expect("exec");
    let mut lines = Vec::new();
    while let Some(line) = exec.output.recv().await {
        lines.push(line.line);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command never reported its exit");
    (lines, status)
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

/// Pause stops the whole sandbox: until resumed, its toolbox refuses
/// commands (the contract checks that resume brings it back at once).
#[tokio::test]
async fn a_stopped_sandbox_refuses_commands_as_not_found() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    h.provider.pause(&sandbox.id).await.expect("pause");
    // Stopped: the toolbox refuses, and that is no "invalid request".
    let err = h.provider.exec(&sandbox.id, &argv(&["true"])).await.err();
    assert!(matches!(err, Some(ProviderError::NotFound(_))), "{err:?}");
    h.provider.resume(&sandbox.id).await.expect("resume");
    let (_, status) = run(&h.provider, &sandbox.id, &argv(&["true"])).await;
    assert_eq!(status, ExitStatus::Code(0));
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
    assert_eq!(lines, ["first", "second", "third"]);
    h.provider.kill(&sandbox.id).await.expect("kill");
}
