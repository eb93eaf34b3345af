//! Who may read events: bearer API keys, configured by id as the SHA-256 of
//! the key (the key itself is never stored), each with scopes, a request
//! rate and a number of live tails it may hold at once.
//!
//! 401: no key, or a key no id holds. 403: a known key without the scope.
//! 429 with `Retry-After`: over the key's rate or its live tails.
//! With no key configured, reads are refused, unless anonymous reads are
//! allowed (dev mode, or `corral up` on loopback): then they are open,
//! rated as one key, `anonymous`.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `GET /v1/runs/{id}/events` (pages).
    Read,
    /// `GET /v1/runs/{id}/events/stream` (live tail).
    Stream,
    /// The console's buttons: stop, pause, resume and continue runs.
    Control,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Stream, Scope::Control];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "events:read",
            Scope::Stream => "events:stream",
            Scope::Control => "runs:control",
        }
    }

    fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.name() == name)
    }
}

/// One configured API key (`api_keys.<id>`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKey {
    /// Hex SHA-256 of the key (`corral keys new` prints it).
    pub sha256: String,
    /// `events:read`, `events:stream`, `runs:control`.
    pub scopes: Vec<String>,
}

/// The SHA-256 of a presented key, hex: what `api_keys.<id>.sha256` holds.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Read limits per key.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub rate_per_sec: u32,
    pub burst: u32,
    pub streams: u32,
}

struct Known {
    id: String,
    scopes: Vec<Scope>,
}

pub struct Auth {
    /// By key hash.
    keys: HashMap<String, Known>,
    /// No keys and dev mode: reads are open.
    open: bool,
    /// Open, and listening on loopback only: the console's buttons work
    /// without a key too (a laptop's `corral up`).
    open_control: bool,
    rate: DefaultKeyedRateLimiter<String>,
    streams: Mutex<HashMap<String, Arc<Semaphore>>>,
    max_streams: usize,
}

/// A key's right to one request, and to a live tail while it holds the permit.
pub struct Granted {
    pub key_id: String,
}

impl Auth {
    /// From the configuration; an error names the bad setting.
    pub fn new(
        keys: &BTreeMap<String, ApiKey>,
        limits: Limits,
        anonymous: bool,
    ) -> Result<Auth, String> {
        let mut by_hash = HashMap::new();
        for (id, key) in keys {
            let hash = key.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "api_keys.{id}.sha256 must be 64 hex digits, the SHA-256 of the key (`corral keys new` prints it)"
                ));
            }
            let mut scopes = Vec::new();
            for name in &key.scopes {
                let scope = Scope::parse(name).ok_or_else(|| {
                    format!(
                        "api_keys.{id}.scopes: unknown scope {name:?} (known: {})",
                        Scope::ALL.map(Scope::name).join(", ")
                    )
                })?;
                scopes.push(scope);
            }
            if by_hash
                .insert(
                    hash,
                    Known {
                        id: id.clone(),
                        scopes,
                    },
                )
                .is_some()
            {
                return Err(format!(
                    "api_keys.{id}.sha256 is the hash of another key too"
                ));
            }
        }
        let per_sec =
            NonZeroU32::new(limits.rate_per_sec).ok_or("read_rate_per_sec must be at least 1")?;
        let burst = NonZeroU32::new(limits.burst.max(limits.rate_per_sec))
            .ok_or("read_burst must be at least 1")?;
        let open = by_hash.is_empty() && anonymous;
        if open {
            tracing::warn!("no api_keys, and anonymous reads allowed: event reads need no key");
        } else if by_hash.is_empty() {
            tracing::warn!(
                "no api_keys configured: event reads answer 401 (see README, Reading events)"
            );
        }
        Ok(Auth {
            keys: by_hash,
            open,
            open_control: false,
            rate: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
            streams: Mutex::new(HashMap::new()),
            max_streams: limits.streams.max(1) as usize,
        })
    }

    /// Lets anonymous requests control runs while reads are open; for an
    /// ingest that listens on loopback only.
    pub fn allow_anonymous_control(&mut self, allow: bool) {
        self.open_control = allow && self.open;
    }

    /// Whether reads need no key.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The key presented in `headers`, if it may do `scope` now.
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<Granted, Refusal> {
        let key_id = self.identify(headers, scope)?;
        if let Err(not_until) = self.rate.check_key(&key_id) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("corral_ingest_reads_limited_total", "why" => "rate").increment(1);
            return Err(too_many(
                format!("key {key_id} is over its read rate"),
                wait.as_secs_f64().ceil().max(1.0) as u64,
            ));
        }
        Ok(Granted { key_id })
    }

    /// A live tail's place among the key's; held as long as the tail.
    pub fn stream_permit(&self, granted: &Granted) -> Result<OwnedSemaphorePermit, Refusal> {
        let semaphore = {
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            streams
                .entry(granted.key_id.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_streams)))
                .clone()
        };
        semaphore.try_acquire_owned().map_err(|_| {
            metrics::counter!("corral_ingest_reads_limited_total", "why" => "streams").increment(1);
            too_many(
                format!(
                    "key {} holds {} live tails, its limit (max_streams_per_key)",
                    granted.key_id, self.max_streams
                ),
                5,
            )
        })
    }

    fn identify(&self, headers: &HeaderMap, scope: Scope) -> Result<String, Refusal> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .or_else(|| cookie(headers, CONSOLE_COOKIE));
        if self.open && presented.is_none() {
            if scope == Scope::Control && !self.open_control {
                return Err(unauthorized(
                    "controlling runs needs an API key with the scope runs:control unless ingest listens on loopback only",
                ));
            }
            return Ok("anonymous".to_owned());
        }
        let Some(presented) = presented else {
            let why = if self.keys.is_empty() {
                "reading events needs an API key and this ingest has none configured (api_keys; `corral keys new`)"
            } else {
                "missing API key: send `Authorization: Bearer <key>`"
            };
            return Err(unauthorized(why));
        };
        let Some(known) = self.keys.get(&hash_key(presented)) else {
            return Err(unauthorized("unknown API key"));
        };
        if !known.scopes.contains(&scope) {
            return Err(error(
                StatusCode::FORBIDDEN,
                format!("key {} lacks the scope {}", known.id, scope.name()),
            ));
        }
        Ok(known.id.clone())
    }
}

/// The cookie the console keeps a signed-in browser's key in (HttpOnly,
/// SameSite=Strict): the same key, the same scopes as the header.
pub const CONSOLE_COOKIE: &str = "corral_key";

/// The value of cookie `name` in `headers`.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// Why a read was refused; answered as JSON `{"error": ...}` with the
/// status, and `WWW-Authenticate` or `Retry-After` where they apply.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u64>,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"corral\""),
            );
        }
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, value);
        }
        response
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        retry_after_secs: None,
    }
}

fn unauthorized(message: &str) -> Refusal {
    error(StatusCode::UNAUTHORIZED, message)
}

fn too_many(message: String, retry_after_secs: u64) -> Refusal {
    Refusal {
        retry_after_secs: Some(retry_after_secs),
        ..error(StatusCode::TOO_MANY_REQUESTS, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            rate_per_sec: 1,
            burst: 2,
            streams: 1,
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
        );
        headers
    }

    fn auth() -> Auth {
        let keys = BTreeMap::from([
            (
                "reader".to_owned(),
                ApiKey {
                    sha256: hash_key("ck_reader"),
                    scopes: vec!["events:read".into()],
                },
            ),
            (
                "tail".to_owned(),
                ApiKey {
                    sha256: hash_key("ck_tail"),
                    scopes: vec!["events:read".into(), "events:stream".into()],
                },
            ),
        ]);
        Auth::new(&keys, limits(), false).expect("auth")
    }

    #[test]
    fn keys_are_told_apart_401_403_429() {
        let auth = auth();
        let status = |r: Result<Granted, Refusal>| r.err().map(|r| r.status());
        assert_eq!(
            status(auth.check(&HeaderMap::new(), Scope::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(auth.check(&bearer("ck_other"), Scope::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            status(auth.check(&bearer("ck_reader"), Scope::Stream)),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(status(auth.check(&bearer("ck_reader"), Scope::Read)), None);
        // The burst (2) is spent by the second; the third waits.
        assert_eq!(status(auth.check(&bearer("ck_reader"), Scope::Read)), None);
        let limited = auth
            .check(&bearer("ck_reader"), Scope::Read)
            .err()
            .expect("limited");
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        let limited = limited.into_response();
        assert_eq!(limited.headers()[header::RETRY_AFTER], "1");
        // Another key has its own rate.
        let tail = auth.check(&bearer("ck_tail"), Scope::Stream).expect("tail");
        let held = auth.stream_permit(&tail).expect("first tail");
        let second = auth.stream_permit(&tail).expect_err("over the limit");
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        drop(held);
        assert!(auth.stream_permit(&tail).is_ok(), "freed with the tail");
    }

    #[test]
    fn the_console_cookie_is_a_key_like_the_header_and_control_is_its_own_scope() {
        let mut keys = BTreeMap::new();
        keys.insert(
            "operator".to_owned(),
            ApiKey {
                sha256: hash_key("ck_operator"),
                scopes: vec!["events:read".into(), "runs:control".into()],
            },
        );
        let auth = Auth::new(&keys, limits(), false).expect("auth");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; corral_key=ck_operator"),
        );
        assert_eq!(
            auth.check(&headers, Scope::Control)
                .expect("control")
                .key_id,
            "operator"
        );
        let reader = Auth::new(&BTreeMap::new(), limits(), true).expect("open");
        let refused = reader
            .check(&HeaderMap::new(), Scope::Control)
            .err()
            .expect("anonymous control needs loopback");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let mut laptop = Auth::new(&BTreeMap::new(), limits(), true).expect("open");
        laptop.allow_anonymous_control(true);
        assert!(laptop.check(&HeaderMap::new(), Scope::Control).is_ok());
    }

    #[test]
    fn no_keys_means_closed_reads_unless_dev_mode() {
        let closed = Auth::new(&BTreeMap::new(), limits(), false).expect("auth");
        let refused = closed
            .check(&HeaderMap::new(), Scope::Read)
            .err()
            .expect("closed");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let open = Auth::new(&BTreeMap::new(), limits(), true).expect("auth");
        assert_eq!(
            open.check(&HeaderMap::new(), Scope::Stream)
                .expect("open")
                .key_id,
            "anonymous"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = |key: ApiKey| {
            Auth::new(&BTreeMap::from([("k".to_owned(), key)]), limits(), false)
                .err()
                .expect("refused")
        };
        let err = bad(ApiKey {
            sha256: "abc".into(),
            scopes: vec![],
        });
        assert!(
            err.contains("api_keys.k.sha256 must be 64 hex digits"),
            "{err}"
        );
        let err = bad(ApiKey {
            sha256: hash_key("x"),
            scopes: vec!["events:write".into()],
        });
        assert!(
            err.contains("api_keys.k.scopes: unknown scope \"events:write\""),
            "{err}"
        );
    }
}
