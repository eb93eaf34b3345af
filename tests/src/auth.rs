//! How tests authenticate: the API key they read events with, the run-token
//! key of every test deployment, and an HTTP client that sends the key.

use std::time::Duration;

use crate::TestEnv;

/// The run-token key of every test deployment.
pub const TOKEN_SECRET: &str = "corral-tests-run-token-key-0123456789";

/// The API key the tests read events with (scopes `events:read` and
/// `events:stream`); [`http`] sends it unless a request names its own
/// `Authorization` (a run token).
pub const API_KEY: &str = "ck_tests_0123456789abcdefghijklmnopqrstuv";

/// The ingest setting that holds [`API_KEY`], with limits no test reaches.
pub fn api_keys() -> std::collections::BTreeMap<String, corral_event_ingest::auth::ApiKey> {
    std::collections::BTreeMap::from([(
        "tests".to_owned(),
        corral_event_ingest::auth::ApiKey {
            sha256: corral_event_ingest::auth::hash_key(API_KEY),
            scopes: vec!["events:read".into(), "events:stream".into()],
        },
    )])
}

/// [`api_keys`] as environment, for an ingest started as a process.
pub fn api_key_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "CORRAL_API_KEYS__TESTS__SHA256",
            corral_event_ingest::auth::hash_key(API_KEY),
        ),
        (
            "CORRAL_API_KEYS__TESTS__SCOPES",
            "[events:read, events:stream]".to_owned(),
        ),
        ("CORRAL_READ_RATE_PER_SEC", "10000".to_owned()),
        ("CORRAL_MAX_STREAMS_PER_KEY", "1000".to_owned()),
    ]
}

/// An HTTP client for tests: no request waits longer than a minute (a
/// streamed answer included), no connection longer than 5 s; it reads
/// events with [`API_KEY`].
pub fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {API_KEY}"))
            .expect("a valid header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client should build")
}

impl TestEnv {
    /// A run token for `run_id`, valid for an hour.
    pub fn token(&self, run_id: &str) -> String {
        corral_common::token::Keyring::single("default", TOKEN_SECRET.as_bytes())
            .mint(run_id, corral_common::now_ms() + 3_600_000)
    }
}
