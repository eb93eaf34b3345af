//! What the remote providers share: an HTTP client, calls retried with a
//! bounded exponential backoff while their failure is transient (connection
//! errors, timeouts, 408, 429 honouring a short `Retry-After`, 5xx), the
//! mapping of what still fails to [`ProviderError`], and the splitting of
//! output chunks into lines.
//!
//! A call hands back the first reply that is not transient, whatever its
//! status: only the provider knows that a 404 means "already gone" for a
//! kill and "not found" for a resume.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::de::DeserializeOwned;

use crate::ProviderError;

/// Limit on one API request, body included. Output streams have none: they
/// last as long as the command.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured: a server asking for more is treated
/// as down, and the call fails as transient soon instead of hanging.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Error bodies are cut to this many bytes in messages.
const MAX_BODY_IN_MESSAGE: usize = 500;
/// Output lines longer than this are split, as the local provider does.
const MAX_LINE: usize = 64 * 1024;

/// One HTTP client per provider, without a global timeout (streams need
/// none); API calls set [`API_TIMEOUT`] per request.
pub(crate) fn http_client(provider: &str) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map_err(|err| {
            ProviderError::Failed(format!("{provider}: cannot build http client: {err}"))
        })
}

/// Checks a configured base URL early, so a typo fails at start-up with the
/// field's name rather than on the first run.
pub(crate) fn check_url(provider: &str, field: &str, url: &str) -> Result<(), ProviderError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|err| ProviderError::Invalid(format!("{provider}: {field} {url:?}: {err}")))?;
    match parsed.scheme() {
        "http" => Ok(()),
        "https" if cfg!(feature = "tls") => Ok(()),
        "https" => Err(ProviderError::Invalid(format!(
            "{provider}: {field} {url:?} is https, but corral-provider was built without \
             its `tls` feature"
        ))),
        other => Err(ProviderError::Invalid(format!(
            "{provider}: {field} {url:?}: scheme {other:?} is neither http nor https"
        ))),
    }
}

/// `key`, or when it is empty the value of the environment variable `var`.
pub(crate) fn key_or_env(key: String, var: &str) -> String {
    if key.is_empty() {
        std::env::var(var).unwrap_or_default()
    } else {
        key
    }
}

/// What a `Debug` of a configuration shows for an API key.
pub(crate) fn redacted(key: &str) -> &'static str {
    if key.is_empty() { "" } else { "<redacted>" }
}

/// A sandbox id as it goes into a URL path: ids are plain tokens, and
/// anything else would address another resource.
pub(crate) fn path_id<'a>(provider: &str, sandbox_id: &'a str) -> Result<&'a str, ProviderError> {
    let plain = !sandbox_id.is_empty()
        && sandbox_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(sandbox_id)
    } else {
        Err(ProviderError::Invalid(format!(
            "{provider}: bad sandbox id {sandbox_id:?}"
        )))
    }
}

/// A whole reply to an API call.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: DeserializeOwned>(
        &self,
        provider: &str,
        what: &str,
    ) -> Result<T, ProviderError> {
        serde_json::from_slice(&self.body).map_err(|err| {
            ProviderError::Failed(format!(
                "{provider} {what}: unexpected response ({err}): {}",
                self.text()
            ))
        })
    }

    /// The body for a message: lossy UTF-8, cut short.
    pub fn text(&self) -> String {
        let end = self.body.len().min(MAX_BODY_IN_MESSAGE);
        let mut text = String::from_utf8_lossy(&self.body[..end]).into_owned();
        if end < self.body.len() {
            text.push_str("...");
        }
        text
    }

    /// The error for a reply the provider has no specific meaning for.
    pub fn error(&self, provider: &str, what: &str) -> ProviderError {
        let message = format!("{provider} {what}: HTTP {}: {}", self.status, self.text());
        match self.status.as_u16() {
            400 | 409 | 412 | 413 | 422 => ProviderError::Invalid(message),
            401 | 403 => ProviderError::Failed(format!("{message} (check the api key)")),
            _ if is_transient(self.status) => ProviderError::Transient(message),
            _ => ProviderError::Failed(message),
        }
    }
}

/// Why one attempt failed: worth another, or not.
pub(crate) enum Failure {
    Retry {
        message: String,
        after: Option<Duration>,
    },
    Fatal(ProviderError),
}

fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// 100 ms doubling to 2 s, 6 attempts in all: about 5 s before a call gives
/// up as transient, short enough for a caller's own retry policy to matter.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .with_max_times(5)
        .with_jitter()
}

/// Runs `attempt` until it succeeds, fails fatally, or the backoff is spent;
/// a retryable failure that outlasts the backoff is [`ProviderError::Transient`].
pub(crate) async fn retrying<T, F, Fut>(
    provider: &str,
    what: &str,
    attempt: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    attempt
        .retry(backoff())
        .when(|failure| matches!(failure, Failure::Retry { .. }))
        .adjust(|failure, delay| match (failure, delay) {
            // `None` means the backoff is spent: keep it that way.
            (
                Failure::Retry {
                    after: Some(after), ..
                },
                Some(_),
            ) => Some((*after).min(MAX_RETRY_AFTER)),
            _ => delay,
        })
        .notify(|failure, delay| {
            if let Failure::Retry { message, .. } = failure {
                tracing::debug!(provider, what, error = %message, ?delay, "retrying remote call");
            }
        })
        .await
        .map_err(|failure| match failure {
            Failure::Retry { message, .. } => ProviderError::Transient(message),
            Failure::Fatal(err) => err,
        })
}

/// An API call: the first reply that is not transient, or `settled` says
/// is an answer despite its status.
pub(crate) async fn call(
    provider: &str,
    what: &str,
    request: impl Fn() -> reqwest::RequestBuilder,
    settled: impl Fn(&Reply) -> bool,
) -> Result<Reply, ProviderError> {
    retrying(provider, what, || async {
        let response = request()
            .timeout(API_TIMEOUT)
            .send()
            .await
            .map_err(|err| request_failure(provider, what, &err))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|err| request_failure(provider, what, &err))?;
        let reply = Reply {
            status,
            headers,
            body,
        };
        if is_transient(status) && !settled(&reply) {
            return Err(retry(provider, what, &reply));
        }
        Ok(reply)
    })
    .await
}

/// One attempt of an API call, with its own timeout and no retry: the reply
/// whatever its status, or [`ProviderError::Transient`] when none came
/// (the request may still have been carried out: see the creates).
pub(crate) async fn call_once(
    provider: &str,
    what: &str,
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<Reply, ProviderError> {
    let failed = |err: reqwest::Error| {
        ProviderError::Transient(format!("{provider} {what}: {}", error_chain(&err)))
    };
    let response = request.timeout(timeout).send().await.map_err(failed)?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(failed)?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Whether a reply's status means "try again" (408, 429, 5xx).
pub(crate) fn transient_status(status: StatusCode) -> bool {
    is_transient(status)
}

/// What opening a stream gave: the stream, or a final refusal.
pub(crate) enum Opened {
    Stream(reqwest::Response),
    Refused(Reply),
}

/// Opens a streaming response (no overall timeout), retrying as [`call`]
/// does until the server answers with headers that are not transient.
pub(crate) async fn open_stream(
    provider: &str,
    what: &str,
    request: impl Fn() -> reqwest::RequestBuilder,
    settled: impl Fn(&Reply) -> bool,
) -> Result<Opened, ProviderError> {
    retrying(provider, what, || async {
        let response = request()
            .send()
            .await
            .map_err(|err| request_failure(provider, what, &err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Opened::Stream(response));
        }
        let headers = response.headers().clone();
        // A refusal's body is short; a failure to read it loses only detail.
        let body = tokio::time::timeout(API_TIMEOUT, response.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let reply = Reply {
            status,
            headers,
            body,
        };
        if is_transient(status) && !settled(&reply) {
            return Err(retry(provider, what, &reply));
        }
        Ok(Opened::Refused(reply))
    })
    .await
}

fn retry(provider: &str, what: &str, reply: &Reply) -> Failure {
    let after = reply
        .headers
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Failure::Retry {
        message: format!("{provider} {what}: HTTP {}: {}", reply.status, reply.text()),
        after,
    }
}

/// Every request error is worth a retry (the connection, a timeout, a body
/// cut short) except a request that could not even be built.
pub(crate) fn request_failure(provider: &str, what: &str, err: &reqwest::Error) -> Failure {
    let message = format!("{provider} {what}: {}", error_chain(err));
    if err.is_builder() {
        Failure::Fatal(ProviderError::Invalid(message))
    } else {
        Failure::Retry {
            message,
            after: None,
        }
    }
}

/// An error with its sources: reqwest's own message hides the cause
/// ("error sending request" without "connection refused").
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Turns output chunks, cut anywhere, into lines without their newline.
#[derive(Default)]
pub(crate) struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// The lines `chunk` completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut lines = Vec::new();
        loop {
            let cut = match self.pending.iter().position(|b| *b == b'\n') {
                Some(newline) if newline <= MAX_LINE => newline,
                _ if self.pending.len() >= MAX_LINE => MAX_LINE,
                _ => break,
            };
            let rest = self.pending.split_off(cut);
            lines.push(String::from_utf8_lossy(&self.pending).into_owned());
            self.pending = rest;
            if self.pending.first() == Some(&b'\n') {
                self.pending.remove(0);
            }
        }
        lines
    }

    /// The last line, if the output did not end with a newline.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(line)
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Milliseconds since the epoch of an RFC 3339 time; 0 if it is missing or
/// malformed (the creation time is informative only).
pub(crate) fn rfc3339_ms(time: Option<&str>) -> i64 {
    time.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_joined_across_chunks_and_the_tail_is_kept() {
        let mut lines = Lines::default();
        assert_eq!(lines.push(b"he"), Vec::<String>::new());
        assert_eq!(lines.push(b"llo\nwor"), vec!["hello"]);
        assert_eq!(lines.push(b"ld\n\nx"), vec!["world", ""]);
        assert_eq!(lines.finish(), Some("x".to_owned()));
        assert_eq!(lines.finish(), None);
    }

    #[test]
    fn an_endless_line_is_split() {
        let mut lines = Lines::default();
        let long = vec![b'a'; MAX_LINE + 10];
        let out = lines.push(&long);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE);
        assert_eq!(lines.finish().map(|l| l.len()), Some(10));
    }

    #[test]
    fn ids_that_are_not_plain_tokens_are_refused() {
        assert!(path_id("e2b", "abc-123_x").is_ok());
        assert!(path_id("e2b", "../x").is_err());
        assert!(path_id("e2b", "").is_err());
    }
}
