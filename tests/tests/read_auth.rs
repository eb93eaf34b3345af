//! Reading events needs an API key with the scope: 401 without one or with
//! an unknown one, 403 without the scope, 429 with `Retry-After` over the
//! key's rate or its live tails. Real HTTP against an in-process ingest.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_event_ingest::auth::{ApiKey, hash_key};
use corral_tests::TestEnv;
use reqwest::StatusCode;

const READER: &str = "ck_reader_abcdefghijklmnopqrstuvwxyz012345";
const TAILER: &str = "ck_tailer_abcdefghijklmnopqrstuvwxyz012345";

/// A client that sends no key of its own.
fn bare() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_need_a_key_with_the_scope_and_are_limited_per_key() {
    let env = TestEnv::new().await;
    let tracker = env.start_tracker().await;
    let mut config = env.ingest_config("127.0.0.1:0");
    config.api_keys = BTreeMap::from([
        (
            "reader".to_owned(),
            ApiKey {
                sha256: hash_key(READER),
                scopes: vec!["events:read".into()],
            },
        ),
        (
            "tailer".to_owned(),
            ApiKey {
                sha256: hash_key(TAILER),
                scopes: vec!["events:read".into(), "events:stream".into()],
            },
        ),
    ]);
    config.read_rate_per_sec = 1;
    config.read_burst = 3;
    config.max_streams_per_key = 1;
    let (ingest, url) = env.start_ingest_with(config).await;
    let http = bare();
    let page = format!("{url}/v1/runs/run-a/events");
    let tail = format!("{url}/v1/runs/run-a/events/stream");

    let none = http.get(&page).send().await.expect("answer");
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert!(
        none.headers().contains_key("www-authenticate"),
        "401 says how to authenticate"
    );
    let unknown = http
        .get(&page)
        .bearer_auth("ck_nobody_0000")
        .send()
        .await
        .expect("answer");
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    let text = unknown.text().await.unwrap_or_default();
    assert!(text.contains("unknown API key"), "{text}");

    // The reader may page, not tail.
    let forbidden = http
        .get(&tail)
        .bearer_auth(READER)
        .send()
        .await
        .expect("answer");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let text = forbidden.text().await.unwrap_or_default();
    assert!(text.contains("lacks the scope events:stream"), "{text}");
    // Its burst (3, the 403 counted none) is spent, then 429 with Retry-After.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let answer = http
            .get(&page)
            .bearer_auth(READER)
            .send()
            .await
            .expect("answer");
        if answer.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = answer
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        }
        statuses.push(answer.status());
    }
    assert_eq!(
        &statuses[..3],
        &[StatusCode::OK; 3],
        "the burst is served: {statuses:?}"
    );
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "over the rate: {statuses:?}"
    );
    assert!(
        retry_after.is_some_and(|secs| secs >= 1),
        "429 says when to retry"
    );

    // The tailer holds one live tail; a second is refused until it closes.
    let first = http
        .get(&tail)
        .bearer_auth(TAILER)
        .send()
        .await
        .expect("answer");
    assert_eq!(first.status(), StatusCode::OK);
    let second = http
        .get(&tail)
        .bearer_auth(TAILER)
        .send()
        .await
        .expect("answer");
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let text = second.text().await.unwrap_or_default();
    assert!(text.contains("live tails"), "{text}");
    drop(first);
    // The server sees the closed connection at its next write (a keep-alive
    // or an event); the permit is free once it does.
    let again = corral_tests::eventually(
        "a tail is allowed again once the first closed",
        Duration::from_secs(60),
        || async {
            let answer = http.get(&tail).bearer_auth(TAILER).send().await.ok()?;
            (answer.status() == StatusCode::OK).then_some(answer)
        },
    )
    .await;
    drop(again);

    ingest.stop().await;
    tracker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_a_weak_token_key_refuses_to_start_naming_the_setting() {
    let env = TestEnv::new().await;
    for (service, var, value, says) in [
        (
            "event-ingest",
            "CORRAL_TOKEN_SECRET",
            "change-me",
            "token_secret (CORRAL_TOKEN_SECRET) is a well-known placeholder",
        ),
        (
            "spawner",
            "CORRAL_TOKEN_KEYS__K1",
            "short",
            "token_keys.k1 (CORRAL_TOKEN_KEYS__K1) is 5 bytes",
        ),
    ] {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(corral_tests::corral_bin())
                .args(["serve", service])
                .env("NATS_URL", &env.nats_url)
                .env("DATABASE_URL", &env.database_url)
                .env("CORRAL_SUBJECT_PREFIX", &env.prefix)
                .env("CORRAL_HOME", &env.home)
                .env(var, value)
                .output(),
        )
        .await
        .expect("a refusing service exits at once")
        .expect("corral runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{service} started with {var}={value}"
        );
        assert!(stderr.contains(says), "{service}: {stderr}");
        assert!(
            stderr.contains("CORRAL_DEV_MODE"),
            "says how a laptop may: {stderr}"
        );
    }
    env.cleanup().await;
}
