//! Live smoke tests against the real E2B and Daytona services, skipped
//! unless their keys are set (`E2B_API_KEY`, `DAYTONA_API_KEY`), with the
//! providers' default URLs (E2B's and Daytona's clouds). Each creates one sandbox, runs a command in it, pauses,
//! resumes, lists and kills it, and checks it is gone. They cost a few cents
//! of sandbox time: run them with
//!
//! ```text
//! E2B_API_KEY=... DAYTONA_API_KEY=... \
//!   cargo test -p corral-tests --test live --features corral-provider/tls -- --nocapture
//! ```
//! (the real APIs are HTTPS: without the `tls` feature the providers refuse
//! their URLs, and the test says so).

use std::time::Duration;

use corral_provider::{
    CreateSpec, DaytonaConfig, DaytonaProvider, E2bConfig, E2bProvider, ExecSpec, ExitStatus,
    Health, LABEL_DEPLOYMENT, LABEL_RUN_ID, Labels, Provider,
};

const LIMIT: Duration = Duration::from_secs(120);

fn key(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|k| !k.trim().is_empty())
}

async fn smoke(provider: &dyn Provider) {
    let run_id = format!("live-{}", uuid::Uuid::now_v7().simple());
    let labels = Labels::from([
        (LABEL_RUN_ID.to_owned(), run_id.clone()),
        (LABEL_DEPLOYMENT.to_owned(), "corral-live-smoke".to_owned()),
    ]);
    let spec = CreateSpec {
        run_id: run_id.clone(),
        labels: labels.clone(),
        lifetime_secs: 600,
        ..CreateSpec::default()
    };
    let sandbox = tokio::time::timeout(LIMIT, provider.create(&spec))
        .await
        .expect("create within the limit")
        .expect("create");
    let outcome = async {
        let exec = ExecSpec {
            argv: vec!["sh".into(), "-c".into(), "echo live-ok; cat".into()],
            env: Default::default(),
        };
        let mut execution = provider.exec(&sandbox.id, &exec).await.expect("exec");
        let mut lines = Vec::new();
        while let Some(line) = execution.output.recv().await {
            lines.push(line.line);
        }
        let status = execution.process.wait().await;
        assert_eq!(status, ExitStatus::Code(0), "{lines:?}");
        assert!(lines.iter().any(|l| l == "live-ok"), "{lines:?}");

        provider.pause(&sandbox.id).await.expect("pause");
        let listed = provider.list(&labels).await.expect("list");
        assert!(
            listed.iter().any(|s| s.id == sandbox.id && s.paused),
            "listed paused: {listed:?}"
        );
        provider.resume(&sandbox.id).await.expect("resume");
        assert_eq!(
            provider.probe(&sandbox.id).await.expect("probe"),
            Health::Healthy
        );
    };
    let result = tokio::time::timeout(LIMIT, outcome).await;
    // Always clean up, then report.
    provider.kill(&sandbox.id).await.expect("kill");
    result.expect("the smoke test within the limit");
    let after = provider.list(&labels).await.expect("list after kill");
    assert!(
        after.iter().all(|s| s.id != sandbox.id),
        "killed sandbox still listed: {after:?}"
    );
    println!("live smoke test passed against {}", provider.name());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_live_smoke() {
    let Some(api_key) = key("E2B_API_KEY") else {
        println!("e2b live smoke test skipped: set E2B_API_KEY to run it");
        return;
    };
    let provider = E2bProvider::new(E2bConfig {
        api_key,
        ..E2bConfig::default()
    })
    .expect("the e2b provider (build with --features corral-provider/tls for https)");
    smoke(&provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daytona_live_smoke() {
    let Some(api_key) = key("DAYTONA_API_KEY") else {
        println!("daytona live smoke test skipped: set DAYTONA_API_KEY to run it");
        return;
    };
    let provider = DaytonaProvider::new(DaytonaConfig {
        api_key,
        ..DaytonaConfig::default()
    })
    .expect("the daytona provider (build with --features corral-provider/tls for https)");
    smoke(&provider).await;
}
