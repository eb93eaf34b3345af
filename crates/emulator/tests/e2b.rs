//! What only E2B does, against the E2B emulator: secure sandboxes whose
//! envd wants a token, timeouts set after create, envd 0.4's default user.
//! What every provider does is in `contract.rs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use corral_emulator::E2bEmulator;
use corral_provider::{CreateSpec, E2bConfig, E2bProvider, ExecSpec, ExitStatus, Health, Provider};
use tempfile::TempDir;

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
    let provider = E2bProvider::new(E2bConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        envd_url: emulator.envd_url(),
        ..E2bConfig::default()
    })
    .expect("provider");
    Harness {
        emulator,
        provider,
        _home: home,
    }
}

fn spec(run_id: &str) -> CreateSpec {
    CreateSpec {
        run_id: run_id.into(),
        ..CreateSpec::default()
    }
}

/// Runs a command to its end; how it ended.
async fn run(provider: &E2bProvider, id: &str, argv: &[&str]) -> ExitStatus {
    let spec = ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
    };
    let mut exec = provider.exec(id, &spec).await.expect("exec");
    while exec.output.recv().await.is_some() {}
    tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command never reported its exit")
}

#[tokio::test]
async fn sandboxes_are_created_secure_and_commands_ask_for_no_stdin() {
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
    // `cat` ends at once (the contract checks that for every provider):
    // here, because the start asked for no stdin.
    assert_eq!(
        run(&h.provider, &sandbox.id, &["cat"]).await,
        ExitStatus::Code(0)
    );
    assert_eq!(
        h.emulator.open_stdin_starts(),
        0,
        "every start sent stdin: false"
    );
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.emulator.sandbox_ids().contains(&sandbox.id) {
        assert!(
            Instant::now() < deadline,
            "the sandbox outlived its timeout"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        h.provider.probe(&sandbox.id).await.expect("probe"),
        Health::Gone(_)
    ));
}

/// envd 0.4 and later run commands as the template's default user: the SDK
/// names none, and neither does corral.
#[tokio::test]
async fn no_user_is_named_to_envd_0_4() {
    let h = harness().await;
    let sandbox = h.provider.create(&spec("r1")).await.expect("create");
    assert_eq!(
        run(&h.provider, &sandbox.id, &["true"]).await,
        ExitStatus::Code(0)
    );
    assert_eq!(h.emulator.user_starts(), 0);
    h.provider.kill(&sandbox.id).await.expect("kill");
}
