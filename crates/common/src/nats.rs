//! NATS plumbing shared by the services and the client: connecting, the
//! streams (provisioned idempotently), publishing to JetStream with a
//! de-duplication id and trace context while awaiting the PubAck,
//! protobuf request-reply, and dead-lettering.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use corral_proto::{Subjects, headers};

use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {error} (is nats-server running with -js?)")]
    Connect {
        url: String,
        error: async_nats::ConnectError,
    },
    #[error("cannot connect to NATS at {url}: {message}")]
    Auth { url: String, message: String },
    #[error("cannot provision stream {stream}: {message} (is JetStream enabled, nats-server -js?)")]
    Stream { stream: String, message: String },
    #[error("publish to {subject} failed: {message}")]
    Publish { subject: String, message: String },
    #[error("request to {subject} failed: {message}")]
    Request { subject: String, message: String },
    #[error("reply from {subject} did not decode: {error}")]
    Decode {
        subject: String,
        error: prost::DecodeError,
    },
}

impl NatsError {
    /// Whether retrying later may succeed (no responders, timeouts, a
    /// reconnecting client), as opposed to a reply that will never decode.
    pub fn is_transient(&self) -> bool {
        !matches!(self, NatsError::Decode { .. })
    }
}

/// How a service proves itself to NATS, and how it checks the server: the
/// NATS ways, any one of them (a creds file, an nkey seed, user and
/// password, a token; user and password may also ride in the URL), with
/// TLS when a CA or a client certificate is given. Environment:
/// `CORRAL_NATS_AUTH__CREDS_FILE` and so on, or the NATS CLI's own
/// `NATS_CREDS`, `NATS_NKEY`, `NATS_USER`, `NATS_PASSWORD`, `NATS_TOKEN`,
/// `NATS_CA`, `NATS_CERT`, `NATS_KEY`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsAuth {
    /// A `.creds` file: the user JWT and its nkey seed (operator mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<std::path::PathBuf>,
    /// A file holding an nkey user seed (`SU...`), as `nk -gen user` writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<std::path::PathBuf>,
    /// The nkey user seed itself (`SU...`), from a secret store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed: Option<crate::Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<crate::Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<crate::Secret>,
    /// CA certificate (PEM) the server's certificate must chain to; TLS on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse a connection without TLS (implied by `tls_ca`/`tls_cert`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tls_required: bool,
    /// Where replies come back (default `_INBOX`): a role's own prefix
    /// (`_INBOX_spawner`), so the server can keep every other party from
    /// reading its replies (`corral keys nats` sets it per role).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_prefix: Option<String>,
}

impl NatsAuth {
    /// The settings as connect options; a file that cannot be read is an
    /// error naming the setting.
    async fn options(&self) -> Result<async_nats::ConnectOptions, String> {
        let mut options = async_nats::ConnectOptions::new();
        let methods = [
            self.creds_file.is_some(),
            self.nkey_file.is_some() || self.nkey_seed.is_some(),
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(
                "nats_auth: give one of creds_file, nkey_file or nkey_seed, user/password, token"
                    .into(),
            );
        }
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|err| format!("nats_auth.creds_file {}: {err}", path.display()))?;
        }
        if let Some(path) = &self.nkey_file {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("nats_auth.nkey_file {}: {err}", path.display()))?;
            let seed = text
                .lines()
                .map(str::trim)
                .find(|line| line.starts_with("SU"))
                .ok_or_else(|| {
                    format!(
                        "nats_auth.nkey_file {} holds no user seed (a line starting SU)",
                        path.display()
                    )
                })?;
            options = options.nkey(seed.to_owned());
        }
        if let Some(seed) = &self.nkey_seed {
            if self.nkey_file.is_some() {
                return Err("nats_auth: give nkey_file or nkey_seed, not both".into());
            }
            if !seed.expose().starts_with("SU") {
                return Err("nats_auth.nkey_seed is not a user seed (it starts SU)".into());
            }
            options = options.nkey(seed.expose().to_owned());
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                options = options.user_and_password(user.clone(), password.expose().to_owned());
            }
            (None, None) => {}
            _ => return Err("nats_auth: user and password go together".into()),
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => return Err("nats_auth: tls_cert and tls_key go together".into()),
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix.clone());
        }
        Ok(options)
    }
}

/// `url` with any password or token in it replaced by `***`, for errors
/// and logs (`nats://user:***@host:4222`). Several comma-separated URLs
/// are redacted each.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, one),
            };
            let redacted = match rest.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{redacted}"),
                None => redacted,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers in `url`: one URL, or several comma-separated (the seed
/// list of a cluster, `nats://n1:4222,nats://n2:4222,nats://n3:4222`). The
/// client starts at a random one, reconnects to the others and learns the
/// rest of the cluster from the server it reaches.
pub fn seeds(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("no NATS URL given (nats_url, NATS_URL)".into());
    }
    urls.into_iter()
        .map(|one| {
            one.parse::<async_nats::ServerAddr>()
                .map_err(|err| format!("{:?} is not a NATS URL: {err}", redact_url(one)))
        })
        .collect()
}

/// Connects with a client name that shows in `nats-server` monitoring,
/// authenticating as `auth` says. A permissions violation (a subject this
/// credential may not use) is logged as an error naming the subject: it
/// means the server's permissions and this service's role disagree.
pub async fn connect(
    url: &str,
    name: &str,
    request_timeout: Duration,
) -> Result<Client, NatsError> {
    connect_with(url, &NatsAuth::default(), name, request_timeout).await
}

/// [`connect`] with credentials and TLS settings.
pub async fn connect_with(
    url: &str,
    auth: &NatsAuth,
    name: &str,
    request_timeout: Duration,
) -> Result<Client, NatsError> {
    let redacted = redact_url(url);
    let options = auth.options().await.map_err(|message| NatsError::Auth {
        url: redacted.clone(),
        message,
    })?;
    let client_name = name.to_owned();
    options
        .name(name)
        .request_timeout(Some(request_timeout))
        .event_callback(move |event| {
            let client_name = client_name.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(what))
                        if what.to_ascii_lowercase().contains("permissions violation") =>
                    {
                        metrics::counter!("corral_nats_permission_violations_total").increment(1);
                        tracing::error!(client = %client_name, violation = %what, "NATS refused a subject this credential may not use (see the permissions table in README)");
                    }
                    async_nats::Event::ServerError(err) => {
                        tracing::warn!(client = %client_name, error = %err, "NATS server error");
                    }
                    async_nats::Event::Disconnected => {
                        tracing::info!(client = %client_name, "NATS disconnected; reconnecting");
                    }
                    _ => {}
                }
            }
        })
        .connect(seeds(url).map_err(|message| NatsError::Auth {
            url: redacted.clone(),
            message,
        })?)
        .await
        .map_err(|error| NatsError::Connect {
            url: redacted,
            error,
        })
}

/// The stream configurations with the default settings (see
/// [`crate::streams`] for configured ones).
pub fn stream_configs(subjects: &Subjects) -> Vec<stream::Config> {
    crate::streams::configs(subjects, &crate::streams::Streams::default()).unwrap_or_default()
}

/// Creates corral's streams, with the default settings, when they are
/// missing; leaves existing ones as they are.
pub async fn ensure_streams(js: &jetstream::Context, subjects: &Subjects) -> Result<(), NatsError> {
    crate::streams::ensure(
        js,
        subjects,
        &crate::streams::Streams::default(),
        crate::streams::Existing::Keep,
    )
    .await
}

/// Headers carrying the current trace context.
pub fn traced_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    telemetry::inject(&mut headers);
    headers
}

/// Publishes to JetStream with `Nats-Msg-Id = msg_id` and the trace context,
/// and returns only once the stream acknowledged it.
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Bytes,
) -> Result<(), NatsError> {
    let mut headers = traced_headers();
    headers.insert(headers::MSG_ID, msg_id);
    let fail = |message: String, subject: &str| NatsError::Publish {
        subject: subject.to_owned(),
        message,
    };
    let ack = js
        .publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|err| fail(err.to_string(), &subject))?;
    ack.await.map_err(|err| fail(err.to_string(), &subject))?;
    Ok(())
}

/// Sends a protobuf request and decodes the protobuf reply.
pub async fn request<Rq, Rp>(
    client: &Client,
    subject: String,
    request: &Rq,
) -> Result<Rp, NatsError>
where
    Rq: prost::Message,
    Rp: prost::Message + Default,
{
    let reply = client
        .request_with_headers(
            subject.clone(),
            traced_headers(),
            request.encode_to_vec().into(),
        )
        .await
        .map_err(|err| NatsError::Request {
            subject: subject.clone(),
            message: err.to_string(),
        })?;
    Rp::decode(reply.payload).map_err(|error| NatsError::Decode { subject, error })
}

/// Copies a message that cannot be processed to `<prefix>.dlq.<what>` with
/// the reason in the `Corral-Error` header, then terminates it on its stream
/// so it is never redelivered. Returns an error (and leaves the message for
/// redelivery) only when the dead-letter publish itself failed. Consumers
/// go through [`crate::delivery::DeadLetters`], which also answers the
/// message when the publish fails.
pub async fn dead_letter(
    js: &jetstream::Context,
    subjects: &Subjects,
    what: &str,
    message: &jetstream::Message,
    error: &str,
) -> Result<(), NatsError> {
    let mut headers = message.headers.clone().unwrap_or_default();
    headers.insert(headers::DLQ_ERROR, sanitize_header(error).as_str());
    headers.insert(headers::DLQ_ORIGINAL_SUBJECT, message.subject.as_str());
    let deliveries = message.info().map(|i| i.delivered).unwrap_or(1);
    headers.insert(headers::DLQ_DELIVERIES, deliveries.to_string().as_str());
    // The dead letter is its own message: a stale Nats-Msg-Id would make the
    // DLQ stream drop it as a duplicate of nothing it holds.
    let mut clean = HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name == headers::MSG_ID {
            // Kept under another name, for `corral dlq replay`.
            for value in values {
                clean.append(headers::DLQ_ORIGINAL_MSG_ID, value.as_str());
            }
            continue;
        }
        for value in values {
            clean.append(name, value.as_str());
        }
    }
    let subject = subjects.dlq(what);
    let ack = js
        .publish_with_headers(subject.clone(), clean, message.payload.clone())
        .await
        .map_err(|err| NatsError::Publish {
            subject: subject.clone(),
            message: err.to_string(),
        })?;
    ack.await.map_err(|err| NatsError::Publish {
        subject: subject.clone(),
        message: err.to_string(),
    })?;
    if let Err(err) = message.ack_with(jetstream::AckKind::Term).await {
        tracing::warn!(error = %err, "dead-lettered message could not be terminated");
    }
    metrics::counter!("corral_dead_letters_total", "kind" => what.to_owned(), "reason" => reason_class(error))
        .increment(1);
    Ok(())
}

/// A dead letter's reason as a metric label: the error up to its first
/// colon, quoted values dropped, at most 48 characters (few distinct values).
pub fn reason_class(error: &str) -> String {
    let head = error.split(':').next().unwrap_or_default();
    let mut class = String::new();
    let mut quoted = false;
    for c in head.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            _ => class.push(c),
        }
    }
    let class: String = class.split_whitespace().collect::<Vec<_>>().join(" ");
    class.chars().take(48).collect()
}

/// Header values are one line of printable text.
fn sanitize_header(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    line.truncate(1024);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_in_urls_are_redacted() {
        assert_eq!(
            redact_url("nats://corral:hunter2@nats:4222"),
            "nats://corral:***@nats:4222"
        );
        assert_eq!(
            redact_url("nats://s3cr3t@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(
            redact_url("tls://a:b@n1:4222,nats://n2:4222"),
            "tls://a:***@n1:4222,nats://n2:4222"
        );
        assert_eq!(redact_url("127.0.0.1:4222"), "127.0.0.1:4222");
        // A password holding '@' is still cut at the last one.
        assert_eq!(redact_url("nats://u:p@ss@h:1"), "nats://u:***@h:1");
    }

    #[test]
    fn a_seed_list_is_every_server_in_it_and_a_bad_one_is_named() {
        let three = seeds("nats://127.0.0.1:4222, nats://127.0.0.1:4223,tls://n3:4224")
            .expect("three servers");
        assert_eq!(three.len(), 3);
        assert_eq!(three[1].port(), 4223);
        assert!(three[2].tls_required());
        let err = seeds("nats://a:1,http://u:secret@b:2").expect_err("refused");
        assert!(err.contains("http://u:***@b:2"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(seeds(" , ").is_err());
    }

    #[tokio::test]
    async fn conflicting_or_half_given_settings_are_refused_naming_them() {
        let both = NatsAuth {
            token: Some(crate::Secret::new("t")),
            user: Some("u".into()),
            password: Some(crate::Secret::new("p")),
            ..Default::default()
        };
        let err = both.options().await.expect_err("refused");
        assert!(err.contains("give one of"), "{err}");
        let half = NatsAuth {
            user: Some("u".into()),
            ..Default::default()
        };
        let err = half.options().await.expect_err("refused");
        assert!(err.contains("user and password go together"), "{err}");
        let missing = NatsAuth {
            nkey_file: Some("/nonexistent/spawner.nk".into()),
            ..Default::default()
        };
        let err = missing.options().await.expect_err("refused");
        assert!(
            err.contains("nats_auth.nkey_file /nonexistent/spawner.nk"),
            "{err}"
        );
    }
}
