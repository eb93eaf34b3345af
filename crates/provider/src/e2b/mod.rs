//! The E2B provider: sandboxes are E2B microVMs managed through the E2B REST
//! API (`X-API-Key` on every call), and commands run through each sandbox's
//! `envd` daemon over Connect RPC (`process.Process/Start`, a server stream
//! of JSON envelopes).
//!
//! Labels travel as E2B metadata, so `list` finds by label what any process
//! created. Sandboxes are created `secure`, so envd wants the access token
//! E2B hands out at creation; it is remembered per sandbox and fetched from
//! the API for sandboxes another process created. Commands start with
//! `stdin: false` (envd would keep stdin open, and a command reading it
//! would wait for ever), under a wrapper that makes each command the lead
//! of its own process group, so that interrupt and kill reach everything it
//! started (`GROUP_WRAPPER` and `SignalControl` in [`envd`]). A user is
//! named to envd only before 0.4.0, as the SDK does. Every API call is retried while its
//! failure is transient (see [`crate::remote`]), except a create: it carries a label of
//! its own ([`crate::LABEL_CREATE`]), and after a failure that leaves its fate
//! unknown the sandbox is looked up by that label before another is asked for.
//!
//! What this follows: `e2b-dev/infra` (`spec/openapi.yml` for `NewSandbox`
//! and `secure`; `packages/envd/spec/process/process.proto` for
//! `StartRequest.stdin`; the client proxy's 502 body for a sandbox that is
//! gone, `packages/shared/pkg/proxy/template/sandbox_not_found.go`; envd's
//! `services/process/handler/handler.go`, whose `SendSignal` signals one pid
//! and stops its output; the API's `parseFilters` for the metadata filter).
//!
//! This module holds the REST API client ([`E2bConfig`], [`E2bProvider`] and
//! its [`Provider`] implementation); [`envd`] runs commands through a
//! sandbox's envd, over the Connect framing of [`crate::connect`].

mod envd;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::remote::{self, Reply};
use crate::{
    CreateSpec, ExecSpec, Execution, Health, KillOutcome, LABEL_CREATE, Labels, Provider,
    ProviderError, SandboxInfo,
};

use envd::EnvdAccess;

const E2B: &str = "e2b";
/// Creates sent before giving up (each after looking for the last one's
/// sandbox by its `corral.create` label).
const CREATE_ATTEMPTS: u32 = 4;
const LIST_PAGE: usize = 100;

/// The longest sandbox timeout E2B accepts (its Pro plan's 24 hours).
const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

/// Where and how to reach E2B. Defaults are E2B's public cloud; the API key
/// comes from the environment ([`E2bConfig::with_env_api_key`]), not a file.
#[derive(Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct E2bConfig {
    /// Base URL of the E2B API.
    pub api_url: String,
    /// Sent as `X-API-Key`.
    pub api_key: String,
    /// Template sandboxes are created from.
    pub template: String,
    /// A sandbox's envd address; `{sandbox_id}` is replaced by its id.
    pub envd_url: String,
    /// Sandbox timeout when [`CreateSpec::lifetime_secs`] is 0, and the one a
    /// resume sets.
    pub timeout_secs: u64,
    /// Whether E2B pauses a sandbox whose timeout passed instead of killing it.
    pub auto_pause: bool,
}

impl Default for E2bConfig {
    fn default() -> E2bConfig {
        E2bConfig {
            api_url: "https://api.e2b.app".into(),
            api_key: String::new(),
            template: "base".into(),
            envd_url: "https://49983-{sandbox_id}.e2b.app".into(),
            timeout_secs: 3600,
            auto_pause: false,
        }
    }
}

impl E2bConfig {
    /// Fills an empty `api_key` from `E2B_API_KEY`.
    pub fn with_env_api_key(mut self) -> E2bConfig {
        self.api_key = remote::key_or_env(self.api_key, "E2B_API_KEY");
        self
    }
}

/// Never prints the key.
impl fmt::Debug for E2bConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("E2bConfig")
            .field("api_url", &self.api_url)
            .field("api_key", &remote::redacted(&self.api_key))
            .field("template", &self.template)
            .field("envd_url", &self.envd_url)
            .field("timeout_secs", &self.timeout_secs)
            .field("auto_pause", &self.auto_pause)
            .finish()
    }
}

/// E2B sandboxes through E2B's API and each sandbox's envd.
pub struct E2bProvider {
    config: E2bConfig,
    http: reqwest::Client,
    /// How to reach each sandbox's envd, by sandbox id.
    envd: Mutex<HashMap<String, EnvdAccess>>,
}

impl E2bProvider {
    /// Checks the configuration; connects lazily.
    pub fn new(config: E2bConfig) -> Result<E2bProvider, ProviderError> {
        if config.api_key.is_empty() {
            return Err(ProviderError::Invalid(
                "e2b: no api key: set E2B_API_KEY or api_key".into(),
            ));
        }
        remote::check_url(E2B, "api_url", &config.api_url)?;
        remote::check_url(
            E2B,
            "envd_url",
            &config.envd_url.replace("{sandbox_id}", "x"),
        )?;
        Ok(E2bProvider {
            http: remote::http_client(E2B)?,
            config,
            envd: Mutex::new(HashMap::new()),
        })
    }

    /// Sets how long from now E2B keeps the sandbox before it expires it.
    pub async fn set_timeout(&self, sandbox_id: &str, secs: u64) -> Result<(), ProviderError> {
        let path = format!("/sandboxes/{}/timeout", remote::path_id(E2B, sandbox_id)?);
        let body = json!({ "timeout": secs });
        let reply = self
            .call("set timeout", Method::POST, &path, Some(&body))
            .await?;
        match reply.status.as_u16() {
            200..=299 => Ok(()),
            404 => Err(ProviderError::NotFound(sandbox_id.to_owned())),
            _ => Err(reply.error(E2B, "set timeout")),
        }
    }

    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ProviderError> {
        self.call_settled(what, method, path, body, |_| false).await
    }

    async fn call_settled(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        settled: impl Fn(&Reply) -> bool,
    ) -> Result<Reply, ProviderError> {
        let url = format!("{}{path}", self.config.api_url.trim_end_matches('/'));
        let request = || {
            let request = self
                .http
                .request(method.clone(), &url)
                .header("X-API-Key", &self.config.api_key);
            match body {
                Some(body) => request.json(body),
                None => request,
            }
        };
        remote::call(E2B, what, request, settled).await
    }

    fn remember_envd(&self, sandbox_id: &str, access: EnvdAccess) {
        let mut envd = self.envd.lock().unwrap_or_else(|p| p.into_inner());
        envd.insert(sandbox_id.to_owned(), access);
    }

    fn forget_envd(&self, sandbox_id: &str) {
        let mut envd = self.envd.lock().unwrap_or_else(|p| p.into_inner());
        envd.remove(sandbox_id);
    }

    /// The sandbox's envd token and version: remembered, or asked of the
    /// API (a sandbox created by another process).
    async fn envd_access(&self, sandbox_id: &str) -> Result<EnvdAccess, ProviderError> {
        let known = {
            let envd = self.envd.lock().unwrap_or_else(|p| p.into_inner());
            envd.get(sandbox_id).cloned()
        };
        if let Some(access) = known {
            return Ok(access);
        }
        let detail = self.detail(sandbox_id).await?;
        let access = EnvdAccess::new(detail.envd_access_token, detail.envd_version.as_deref());
        self.remember_envd(sandbox_id, access.clone());
        Ok(access)
    }

    async fn detail(&self, sandbox_id: &str) -> Result<SandboxDetail, ProviderError> {
        let path = format!("/sandboxes/{}", remote::path_id(E2B, sandbox_id)?);
        let reply = self
            .call_settled("get sandbox", Method::GET, &path, None, proxy_lost_sandbox)
            .await?;
        match reply.status.as_u16() {
            200 => reply.json(E2B, "get sandbox"),
            404 | 410 => Err(ProviderError::NotFound(sandbox_id.to_owned())),
            _ if proxy_lost_sandbox(&reply) => Err(ProviderError::NotFound(sandbox_id.to_owned())),
            _ => Err(reply.error(E2B, "get sandbox")),
        }
    }

    async fn list_page(
        &self,
        labels: &Labels,
        next_token: Option<&str>,
    ) -> Result<(Vec<SandboxDetail>, Option<String>), ProviderError> {
        let mut url = reqwest::Url::parse(&format!(
            "{}/v2/sandboxes",
            self.config.api_url.trim_end_matches('/')
        ))
        .map_err(|err| ProviderError::Invalid(format!("e2b: api_url: {err}")))?;
        {
            let mut query = url.query_pairs_mut();
            if !labels.is_empty() {
                query.append_pair("metadata", &metadata_filter(labels));
            }
            query.append_pair("state", "running,paused");
            query.append_pair("limit", &LIST_PAGE.to_string());
            if let Some(token) = next_token {
                query.append_pair("nextToken", token);
            }
        }
        let request = || {
            self.http
                .get(url.clone())
                .header("X-API-Key", &self.config.api_key)
        };
        let reply = remote::call(E2B, "list sandboxes", request, |_| false).await?;
        if reply.status != StatusCode::OK {
            return Err(reply.error(E2B, "list sandboxes"));
        }
        let next = reply
            .headers
            .get("x-next-token")
            .and_then(|value| value.to_str().ok())
            .filter(|token| !token.is_empty())
            .map(str::to_owned);
        Ok((reply.json(E2B, "list sandboxes")?, next))
    }
}

/// E2B's edge proxy answers a sandbox that is gone with 502 and
/// `{"sandboxId", "message": "The sandbox was not found", "code": 502}`
/// (`e2b-dev/infra`, `packages/shared/pkg/proxy/template/sandbox_not_found.go`):
/// an answer, not an outage. Any other 502 is the proxy failing.
fn proxy_lost_sandbox(reply: &Reply) -> bool {
    #[derive(Deserialize)]
    struct NotFound {
        #[serde(rename = "sandboxId", default)]
        sandbox_id: String,
        #[serde(default)]
        message: String,
    }
    reply.status == StatusCode::BAD_GATEWAY
        && serde_json::from_slice::<NotFound>(&reply.body).is_ok_and(|body| {
            !body.sandbox_id.is_empty() && body.message.to_ascii_lowercase().contains("not found")
        })
}

#[async_trait::async_trait]
impl Provider for E2bProvider {
    fn name(&self) -> &'static str {
        "e2b"
    }

    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        // E2B refuses a timeout above its plan's limit (24 h at most); a
        // kept session that lives longer is paused (or replaced) before.
        let timeout = match spec.lifetime_secs {
            0 => self.config.timeout_secs,
            secs => secs,
        }
        .min(MAX_TIMEOUT_SECS);
        let mut labels = spec.labels.clone();
        let create_id = uuid::Uuid::now_v7().simple().to_string();
        labels.insert(LABEL_CREATE.into(), create_id.clone());
        // `secure`: envd gets an access token, without which anyone who
        // knows the sandbox's address could run commands in it (the
        // official SDK sends it too).
        let body = json!({
            "templateID": self.config.template,
            "timeout": timeout,
            "metadata": labels,
            "autoPause": self.config.auto_pause,
            "secure": true,
        });
        let url = format!("{}/sandboxes", self.config.api_url.trim_end_matches('/'));
        let mut last = String::new();
        for attempt in 0..CREATE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let request = self
                .http
                .post(&url)
                .header("X-API-Key", &self.config.api_key)
                .json(&body);
            let reply =
                remote::call_once(E2B, "create sandbox", request, remote::API_TIMEOUT).await;
            match reply {
                Ok(reply) if reply.status.is_success() => {
                    let created: CreatedSandbox = reply.json(E2B, "create sandbox")?;
                    let access =
                        EnvdAccess::new(created.envd_access_token, created.envd_version.as_deref());
                    self.remember_envd(&created.sandbox_id, access);
                    return Ok(SandboxInfo {
                        id: created.sandbox_id,
                        labels,
                        created_at_ms: remote::now_ms(),
                        paused: false,
                    });
                }
                Ok(reply) if !remote::transient_status(reply.status) => {
                    return Err(reply.error(E2B, "create sandbox"));
                }
                Ok(reply) => last = reply.error(E2B, "create sandbox").to_string(),
                Err(err) => last = err.to_string(),
            }
            // The create may have happened: adopt it, never make a second.
            let mut mine = Labels::new();
            mine.insert(LABEL_CREATE.into(), create_id.clone());
            if let Ok((found, _)) = self.list_page(&mine, None).await
                && let Some(sandbox) = found.into_iter().next()
            {
                tracing::info!(sandbox_id = %sandbox.sandbox_id, "e2b create answer lost: adopting the sandbox it made");
                // A listed sandbox carries no envd token (`ListedSandbox`):
                // the first command asks for it (`GET /sandboxes/{id}`).
                self.forget_envd(&sandbox.sandbox_id);
                return Ok(sandbox.into_info());
            }
        }
        Err(ProviderError::Transient(format!(
            "e2b create sandbox: {CREATE_ATTEMPTS} attempts: {last}"
        )))
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Execution, ProviderError> {
        remote::path_id(E2B, sandbox_id)?;
        self.start(sandbox_id, spec).await
    }

    async fn kill(&self, sandbox_id: &str) -> Result<KillOutcome, ProviderError> {
        let path = format!("/sandboxes/{}", remote::path_id(E2B, sandbox_id)?);
        let reply = self
            .call("kill sandbox", Method::DELETE, &path, None)
            .await?;
        let outcome = match reply.status.as_u16() {
            200..=299 => KillOutcome::Killed,
            404 | 410 => KillOutcome::AlreadyGone,
            _ => return Err(reply.error(E2B, "kill sandbox")),
        };
        self.forget_envd(sandbox_id);
        Ok(outcome)
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let path = format!("/sandboxes/{}/pause", remote::path_id(E2B, sandbox_id)?);
        let reply = self
            .call("pause sandbox", Method::POST, &path, None)
            .await?;
        match reply.status.as_u16() {
            // 409: already paused, which is what was asked.
            200..=299 | 409 => Ok(()),
            404 | 410 => Err(ProviderError::NotFound(sandbox_id.to_owned())),
            _ => Err(reply.error(E2B, "pause sandbox")),
        }
    }

    /// Connects, which resumes a paused sandbox and sets its timeout to the
    /// configured `timeout_secs` from now.
    async fn resume(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let path = format!("/sandboxes/{}/connect", remote::path_id(E2B, sandbox_id)?);
        let body = json!({ "timeout": self.config.timeout_secs });
        let reply = self
            .call("resume sandbox", Method::POST, &path, Some(&body))
            .await?;
        match reply.status.as_u16() {
            200..=299 => {
                // A resumed sandbox may come back with a new envd token.
                if let Ok(connected) = reply.json::<CreatedSandbox>(E2B, "resume sandbox") {
                    let access = EnvdAccess::new(
                        connected.envd_access_token,
                        connected.envd_version.as_deref(),
                    );
                    self.remember_envd(sandbox_id, access);
                }
                Ok(())
            }
            404 | 410 => Err(ProviderError::NotFound(sandbox_id.to_owned())),
            _ => Err(reply.error(E2B, "resume sandbox")),
        }
    }

    async fn probe(&self, sandbox_id: &str) -> Result<Health, ProviderError> {
        match self.detail(sandbox_id).await {
            Ok(detail) if detail.state == "running" || detail.state == "paused" => {
                Ok(Health::Healthy)
            }
            Ok(detail) => Ok(Health::Gone(format!("e2b: sandbox is {:?}", detail.state))),
            Err(ProviderError::NotFound(_)) => {
                self.forget_envd(sandbox_id);
                Ok(Health::Gone("e2b: sandbox not found (404)".into()))
            }
            Err(err) => Err(err),
        }
    }

    async fn list(&self, labels: &Labels) -> Result<Vec<SandboxInfo>, ProviderError> {
        let mut found = Vec::new();
        let mut next = None;
        loop {
            let (page, token) = self.list_page(labels, next.as_deref()).await?;
            found.extend(page.into_iter().map(SandboxDetail::into_info));
            match token {
                Some(token) => next = Some(token),
                None => break,
            }
        }
        // The API filters already; this guards against a server that ignores
        // the filter, since the reaper kills what `list` returns.
        found.retain(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)));
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found.dedup_by(|a, b| a.id == b.id);
        Ok(found)
    }
}

#[derive(Deserialize)]
struct CreatedSandbox {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "envdAccessToken", default)]
    envd_access_token: Option<String>,
    #[serde(rename = "envdVersion", default)]
    envd_version: Option<String>,
}

/// The `metadata` query value of a list: E2B's API unescapes the value it
/// was given as a whole, splits it at `&` and `=`, and unescapes each key
/// and value again (`packages/api/internal/utils/sandboxes_list.go`,
/// `parseFilters`). So each key and value is escaped, the pairs joined, and
/// the whole escaped once more (the query's own encoding comes on top):
/// otherwise a value holding `% + & =` never matches.
fn metadata_filter(labels: &Labels) -> String {
    let pairs: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{}={}", escape(key), escape(value)))
        .collect();
    escape(&pairs.join("&"))
}

fn escape(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A sandbox as `GET /sandboxes/{id}` and `GET /v2/sandboxes` describe it.
#[derive(Deserialize)]
struct SandboxDetail {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "startedAt", default)]
    started_at: Option<String>,
    #[serde(rename = "envdAccessToken", default)]
    envd_access_token: Option<String>,
    #[serde(rename = "envdVersion", default)]
    envd_version: Option<String>,
}

impl SandboxDetail {
    fn into_info(self) -> SandboxInfo {
        SandboxInfo {
            created_at_ms: remote::rfc3339_ms(self.started_at.as_deref()),
            paused: self.state == "paused",
            labels: self.metadata.unwrap_or_default(),
            id: self.sandbox_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_filter_escapes_each_pair_and_then_the_whole() {
        let labels = Labels::from([("k".to_owned(), "a&b=c".to_owned())]);
        // Pair: k=a%26b%3Dc; whole: k%3Da%2526b%253Dc.
        assert_eq!(metadata_filter(&labels), "k%3Da%2526b%253Dc");
    }

    #[test]
    fn the_config_never_prints_its_key() {
        let config = E2bConfig {
            api_key: "secret".into(),
            ..E2bConfig::default()
        };
        assert!(!format!("{config:?}").contains("secret"));
    }
}
