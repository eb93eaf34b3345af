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
//! started ([`GROUP_WRAPPER`], [`SignalControl`]). A user is named to envd
//! only before 0.4.0, as the SDK does. Every API call is retried while its
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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::remote::{self, Opened, Reply};
use crate::{
    CreateSpec, ExecControl, ExecSpec, Execution, ExitStatus, Health, KillOutcome, LABEL_CREATE,
    Labels, OutputLine, OutputStream, Process, Provider, ProviderError, SandboxInfo,
};

const E2B: &str = "e2b";
/// Creates sent before giving up (each after looking for the last one's
/// sandbox by its `corral.create` label).
const CREATE_ATTEMPTS: u32 = 4;
/// envd older than 0.4.0 picks the user a command runs as from Basic auth:
/// `user:` (no password), as the SDK names it; newer envd runs commands as
/// the template's default user and is sent no user, as the SDK does.
const ENVD_USER_AUTH: &str = "Basic dXNlcjo=";
/// The first envd version with a default user.
const ENVD_DEFAULT_USER: (u64, u64, u64) = (0, 4, 0);
/// Runs the command as the lead of a session and process group of its own
/// (`setsid` without a fork: envd's children lead no group), so that
/// interrupt and kill can signal the whole group; envd's `SendSignal`
/// reaches only the one pid. Without `setsid` in the template the command
/// runs as before and only its own pid can be signalled.
const GROUP_WRAPPER: &str = r#"command -v setsid >/dev/null 2>&1 && exec setsid "$@"; exec "$@""#;
/// Asks envd for a keepalive message this often (seconds), so idle proxies
/// keep a quiet command's stream open.
const KEEPALIVE_SECS: u64 = 50;
/// A stream silent for this long (three missed keepalives) is dead.
const STREAM_IDLE: Duration = Duration::from_secs(3 * KEEPALIVE_SECS);
/// Larger Connect envelopes are refused rather than buffered.
const MAX_ENVELOPE: usize = 16 * 1024 * 1024;
const END_STREAM_FLAG: u8 = 0x02;
const COMPRESSED_FLAG: u8 = 0x01;
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

    fn envd_url(&self, sandbox_id: &str, rpc: &str) -> String {
        let base = self.config.envd_url.replace("{sandbox_id}", sandbox_id);
        format!("{}/process.Process/{rpc}", base.trim_end_matches('/'))
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

    /// Starts the command and waits for envd's start event, so that a
    /// command that cannot start fails here, as the local provider's does.
    async fn start(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Execution, ProviderError> {
        if spec.argv.is_empty() {
            return Err(ProviderError::Invalid("empty argv".into()));
        }
        let envd = self.envd_access(sandbox_id).await?;
        let mut envs = spec.env.clone();
        envs.entry("CORRAL_SANDBOX_ID".into())
            .or_insert_with(|| sandbox_id.to_owned());
        // stdin: envd keeps a command's stdin open unless told not to, and
        // a command that reads it would wait for ever.
        let mut args = vec![
            "-c".to_owned(),
            GROUP_WRAPPER.to_owned(),
            "corral".to_owned(),
        ];
        args.extend(spec.argv.iter().cloned());
        let message = json!({
            "process": { "cmd": "/bin/sh", "args": args, "envs": envs },
            "stdin": false,
        });
        let body = envelope(0, &message);
        let url = self.envd_url(sandbox_id, "Start");
        let request = || {
            let request = self
                .http
                .post(&url)
                .header("Content-Type", "application/connect+json")
                .header("Connect-Protocol-Version", "1")
                .header("Keepalive-Ping-Interval", KEEPALIVE_SECS.to_string())
                .body(body.clone());
            envd.authorize(request)
        };
        let response = match remote::open_stream(E2B, "exec", request, proxy_lost_sandbox).await? {
            Opened::Stream(response) => response,
            Opened::Refused(reply) => {
                if reply.status == StatusCode::UNAUTHORIZED {
                    // The token may have changed (a resume elsewhere): ask
                    // the API again next time.
                    self.forget_envd(sandbox_id);
                }
                return Err(refused_exec(sandbox_id, &reply));
            }
        };
        let mut envelopes = Envelopes::new(response);
        let (tx, output) = mpsc::channel(256);
        let (exit_tx, exit) = watch::channel(None);
        let mut pump = Pump::new(tx, exit_tx);
        let pid = loop {
            match envelopes.next().await? {
                Some(envelope) => match decode(envelope)? {
                    Event::Start(pid) => break pid,
                    Event::Finished(result) => {
                        result?;
                        return Err(ProviderError::Failed(
                            "e2b exec: envd ended the stream before the process started".into(),
                        ));
                    }
                    event => pump.handle(event).await,
                },
                None => {
                    return Err(ProviderError::Failed(
                        "e2b exec: the stream ended before the process started".into(),
                    ));
                }
            }
        };
        tokio::spawn(pump.run(envelopes, sandbox_id.to_owned(), pid));
        let control = SignalControl {
            http: self.http.clone(),
            start_url: self.envd_url(sandbox_id, "Start"),
            signal_url: self.envd_url(sandbox_id, "SendSignal"),
            envd,
            pid,
            runtime: tokio::runtime::Handle::current(),
        };
        Ok(Execution {
            output,
            process: Process::new(exit, Box::new(control)),
        })
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

fn refused_exec(sandbox_id: &str, reply: &Reply) -> ProviderError {
    if proxy_lost_sandbox(reply) || reply.status == StatusCode::NOT_FOUND {
        return ProviderError::NotFound(sandbox_id.to_owned());
    }
    // A Connect error before the stream started: {"code", "message"}.
    match serde_json::from_slice::<ConnectError>(&reply.body) {
        Ok(err) if !err.code.is_empty() => err.into_provider_error("exec"),
        _ => reply.error(E2B, "exec"),
    }
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

/// What envd wants of a request: the sandbox's access token (a `secure`
/// sandbox's), and a user named for envd before 0.4.0.
#[derive(Clone)]
struct EnvdAccess {
    token: Option<String>,
    names_user: bool,
}

impl EnvdAccess {
    fn new(token: Option<String>, version: Option<&str>) -> EnvdAccess {
        EnvdAccess {
            token,
            names_user: envd_wants_user(version),
        }
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = if self.names_user {
            request.header("Authorization", ENVD_USER_AUTH)
        } else {
            request
        };
        match &self.token {
            Some(token) => request.header("X-Access-Token", token),
            None => request,
        }
    }
}

/// Whether envd of this version needs the user named, as the SDK decides
/// (`envdVersion < 0.4.0`). A version that cannot be read is taken as old:
/// naming the user works on every envd.
fn envd_wants_user(version: Option<&str>) -> bool {
    let Some(version) = version else {
        return true;
    };
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<Option<u64>> = core.split('.').map(|p| p.parse().ok()).collect();
    match parts[..] {
        [Some(major), Some(minor), Some(patch)] => (major, minor, patch) < ENVD_DEFAULT_USER,
        _ => true,
    }
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

/// One Connect envelope: a flags byte, the length (big-endian u32), the JSON.
fn envelope(flags: u8, message: &serde_json::Value) -> Bytes {
    let json = serde_json::to_vec(message).expect("a json value should serialize");
    let mut frame = BytesMut::with_capacity(5 + json.len());
    frame.extend_from_slice(&[flags]);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    frame.freeze()
}

struct Envelope {
    end_stream: bool,
    data: Bytes,
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Reads Connect envelopes off a streaming response.
struct Envelopes {
    body: ByteStream,
    buf: BytesMut,
}

impl Envelopes {
    fn new(response: reqwest::Response) -> Envelopes {
        Envelopes {
            body: Box::pin(response.bytes_stream()),
            buf: BytesMut::new(),
        }
    }

    /// The next envelope; `None` at a clean end of the body.
    async fn next(&mut self) -> Result<Option<Envelope>, ProviderError> {
        loop {
            if let Some(envelope) = self.take()? {
                return Ok(Some(envelope));
            }
            let chunk = tokio::time::timeout(STREAM_IDLE, self.body.next())
                .await
                .map_err(|_| {
                    ProviderError::Transient(format!("e2b exec: envd silent for {STREAM_IDLE:?}"))
                })?;
            match chunk {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(err)) => {
                    return Err(ProviderError::Transient(format!(
                        "e2b exec: stream broke: {}",
                        remote::error_chain(&err)
                    )));
                }
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(ProviderError::Transient(
                        "e2b exec: stream ended inside an envelope".into(),
                    ));
                }
            }
        }
    }

    fn take(&mut self) -> Result<Option<Envelope>, ProviderError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_ENVELOPE || flags & COMPRESSED_FLAG != 0 {
            return Err(ProviderError::Failed(format!(
                "e2b exec: unexpected envelope (flags {flags:#x}, {len} bytes)"
            )));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let data = self.buf.split_to(len).freeze();
        Ok(Some(Envelope {
            end_stream: flags & END_STREAM_FLAG != 0,
            data,
        }))
    }
}

/// What one envelope of the Start stream says.
enum Event {
    Start(u32),
    Output(OutputStream, Vec<u8>),
    End(ExitStatus),
    /// The end-stream envelope: clean, or with the RPC's error.
    Finished(Result<(), ProviderError>),
    /// Keepalives and anything newer than this client.
    Other,
}

#[derive(Deserialize)]
struct StartResponse {
    #[serde(default)]
    event: Option<ProcessEvent>,
}

#[derive(Deserialize)]
struct ProcessEvent {
    #[serde(default)]
    start: Option<StartEvent>,
    #[serde(default)]
    data: Option<DataEvent>,
    #[serde(default)]
    end: Option<EndEvent>,
}

#[derive(Deserialize)]
struct StartEvent {
    #[serde(default)]
    pid: u32,
}

#[derive(Deserialize)]
struct DataEvent {
    #[serde(default)]
    stdout: Option<String>,
    #[serde(default)]
    stderr: Option<String>,
}

/// Protobuf JSON leaves out defaults: an exit code of 0 arrives as no field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndEvent {
    #[serde(default)]
    exit_code: i32,
    #[serde(default)]
    exited: bool,
    #[serde(default)]
    status: String,
}

#[derive(Deserialize)]
struct EndStream {
    #[serde(default)]
    error: Option<ConnectError>,
}

#[derive(Deserialize)]
struct ConnectError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl ConnectError {
    fn into_provider_error(self, what: &str) -> ProviderError {
        let message = format!("e2b {what}: {}: {}", self.code, self.message);
        // envd reports a program it cannot start as Go's exec error.
        let cannot_start = self.message.contains("executable file not found")
            || self.message.contains("no such file or directory");
        match self.code.as_str() {
            "invalid_argument" | "not_found" | "failed_precondition" | "out_of_range" => {
                ProviderError::Invalid(message)
            }
            _ if cannot_start => ProviderError::Invalid(message),
            "unavailable" | "resource_exhausted" | "deadline_exceeded" | "aborted" => {
                ProviderError::Transient(message)
            }
            _ => ProviderError::Failed(message),
        }
    }
}

fn decode(envelope: Envelope) -> Result<Event, ProviderError> {
    let malformed = |err: serde_json::Error| {
        ProviderError::Failed(format!(
            "e2b exec: malformed envd message ({err}): {}",
            String::from_utf8_lossy(&envelope.data)
        ))
    };
    if envelope.end_stream {
        let end: EndStream = serde_json::from_slice(&envelope.data).map_err(malformed)?;
        return Ok(Event::Finished(match end.error {
            Some(err) => Err(err.into_provider_error("exec")),
            None => Ok(()),
        }));
    }
    let message: StartResponse = serde_json::from_slice(&envelope.data).map_err(malformed)?;
    let Some(event) = message.event else {
        return Ok(Event::Other);
    };
    if let Some(start) = event.start {
        return Ok(Event::Start(start.pid));
    }
    if let Some(end) = event.end {
        return Ok(Event::End(exit_status(&end)));
    }
    if let Some(data) = event.data {
        let (stream, text) = match (data.stdout, data.stderr) {
            (Some(text), _) => (OutputStream::Stdout, text),
            (None, Some(text)) => (OutputStream::Stderr, text),
            (None, None) => return Ok(Event::Other),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|err| ProviderError::Failed(format!("e2b exec: bad output chunk: {err}")))?;
        return Ok(Event::Output(stream, bytes));
    }
    Ok(Event::Other)
}

/// envd reports Go's process state: `exited` with a code, or a status such
/// as "signal: killed".
fn exit_status(end: &EndEvent) -> ExitStatus {
    if end.exited {
        return ExitStatus::Code(end.exit_code);
    }
    match end.status.strip_prefix("signal: ") {
        Some(name) => ExitStatus::Signal(signal_number(name)),
        None if end.exit_code >= 0 && !end.status.is_empty() => ExitStatus::Code(end.exit_code),
        None => ExitStatus::Signal(libc::SIGKILL),
    }
}

/// Go's names for signals (`syscall.Signal.String`).
fn signal_number(name: &str) -> i32 {
    match name {
        "hangup" => libc::SIGHUP,
        "interrupt" => libc::SIGINT,
        "quit" => libc::SIGQUIT,
        "aborted" => libc::SIGABRT,
        "segmentation fault" => libc::SIGSEGV,
        "broken pipe" => libc::SIGPIPE,
        "alarm clock" => libc::SIGALRM,
        "terminated" => libc::SIGTERM,
        "user defined signal 1" => libc::SIGUSR1,
        "user defined signal 2" => libc::SIGUSR2,
        "CPU time limit exceeded" => libc::SIGXCPU,
        _ => libc::SIGKILL,
    }
}

/// Moves the Start stream into an [`Execution`]'s output and exit.
struct Pump {
    tx: mpsc::Sender<OutputLine>,
    exit: watch::Sender<Option<ExitStatus>>,
    stdout: remote::Lines,
    stderr: remote::Lines,
}

impl Pump {
    fn new(tx: mpsc::Sender<OutputLine>, exit: watch::Sender<Option<ExitStatus>>) -> Pump {
        Pump {
            tx,
            exit,
            stdout: remote::Lines::default(),
            stderr: remote::Lines::default(),
        }
    }

    async fn send(&self, stream: OutputStream, line: String) {
        // A reader that went away still needs the exit: keep draining.
        let _ = self.tx.send(OutputLine { stream, line }).await;
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Output(stream, bytes) => {
                let lines = match stream {
                    OutputStream::Stdout => self.stdout.push(&bytes),
                    OutputStream::Stderr => self.stderr.push(&bytes),
                };
                for line in lines {
                    self.send(stream, line).await;
                }
            }
            Event::End(status) => {
                // The process is gone: its last unfinished lines are complete.
                self.flush().await;
                let _ = self.exit.send(Some(status));
            }
            Event::Start(_) | Event::Finished(_) | Event::Other => {}
        }
    }

    async fn flush(&mut self) {
        if let Some(line) = self.stdout.finish() {
            self.send(OutputStream::Stdout, line).await;
        }
        if let Some(line) = self.stderr.finish() {
            self.send(OutputStream::Stderr, line).await;
        }
    }

    /// Runs to the end of the stream. A stream that ends without the end
    /// event leaves the exit unset, which [`Process::wait`] reports as
    /// SIGKILL: the command can no longer be watched.
    async fn run(mut self, mut envelopes: Envelopes, sandbox_id: String, pid: u32) {
        loop {
            let event = match envelopes.next().await {
                Ok(Some(envelope)) => decode(envelope),
                Ok(None) => break,
                Err(err) => Err(err),
            };
            match event {
                Ok(Event::Finished(Ok(()))) => break,
                Ok(Event::Finished(Err(err))) | Err(err) => {
                    tracing::warn!(sandbox_id, pid, error = %err, "e2b command stream failed");
                    break;
                }
                Ok(event) => self.handle(event).await,
            }
        }
        self.flush().await;
        if self.exit.borrow().is_none() {
            tracing::warn!(
                sandbox_id,
                pid,
                "e2b command stream ended without an exit status"
            );
        }
    }
}

/// Signals a command's whole process group: a second command, `kill` of
/// the group ([`GROUP_WRAPPER`] made the command lead one), then envd's
/// unary `SendSignal` to the command's own pid where the group could not be
/// signalled (a template without `setsid`) or the signal is SIGKILL. envd's
/// `SendSignal` reaches that one pid only, and after SIGTERM or SIGKILL
/// envd forwards no more of its output; the group signal leaves the output
/// flowing while the command winds down. The trait is sync, so each signal
/// is a task on the runtime that started the command.
struct SignalControl {
    http: reqwest::Client,
    start_url: String,
    signal_url: String,
    envd: EnvdAccess,
    pid: u32,
    runtime: tokio::runtime::Handle,
}

/// Ends a group signal command that has not answered.
const GROUP_SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

impl SignalControl {
    fn send(&self, signal: Signal) {
        let group = GroupSignal {
            http: self.http.clone(),
            start_url: self.start_url.clone(),
            signal_url: self.signal_url.clone(),
            envd: self.envd.clone(),
            pid: self.pid,
        };
        self.runtime.spawn(async move {
            let grouped = match tokio::time::timeout(GROUP_SIGNAL_TIMEOUT, group.kill_group(signal))
                .await
            {
                Ok(Ok(())) => true,
                Ok(Err(err)) => {
                    tracing::warn!(pid = group.pid, signal = signal.name(), error = %err, "e2b group signal failed: signalling the command alone");
                    false
                }
                Err(_) => {
                    tracing::warn!(pid = group.pid, signal = signal.name(), "e2b group signal timed out: signalling the command alone");
                    false
                }
            };
            if !grouped || signal == Signal::Kill {
                group.signal_pid(signal).await;
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Kill => "KILL",
        }
    }
}

struct GroupSignal {
    http: reqwest::Client,
    start_url: String,
    signal_url: String,
    envd: EnvdAccess,
    pid: u32,
}

impl GroupSignal {
    /// `kill -s SIG -- -PID` through envd, waited for: `Ok` once it exits 0.
    async fn kill_group(&self, signal: Signal) -> Result<(), ProviderError> {
        let script = format!("kill -s {} -- -{}", signal.name(), self.pid);
        let message = json!({
            "process": { "cmd": "/bin/sh", "args": ["-c", script] },
            "stdin": false,
        });
        let body = envelope(0, &message);
        let request = || {
            let request = self
                .http
                .post(&self.start_url)
                .header("Content-Type", "application/connect+json")
                .header("Connect-Protocol-Version", "1")
                .body(body.clone());
            self.envd.authorize(request)
        };
        let response =
            match remote::open_stream(E2B, "signal group", request, proxy_lost_sandbox).await? {
                Opened::Stream(response) => response,
                Opened::Refused(reply) => return Err(reply.error(E2B, "signal group")),
            };
        let mut envelopes = Envelopes::new(response);
        while let Some(envelope) = envelopes.next().await? {
            match decode(envelope)? {
                Event::End(ExitStatus::Code(0)) => return Ok(()),
                Event::End(status) => {
                    return Err(ProviderError::Failed(format!(
                        "e2b signal group: kill ended {status:?} (no such group?)"
                    )));
                }
                Event::Finished(result) => {
                    result?;
                    break;
                }
                _ => {}
            }
        }
        Err(ProviderError::Failed(
            "e2b signal group: the stream ended without an exit".into(),
        ))
    }

    /// envd's `SendSignal` to the command's own pid.
    async fn signal_pid(&self, signal: Signal) {
        let pid = self.pid;
        let name = match signal {
            Signal::Term => "SIGNAL_SIGTERM",
            Signal::Kill => "SIGNAL_SIGKILL",
        };
        let body = json!({ "process": { "pid": pid }, "signal": name });
        let request = || {
            let request = self
                .http
                .post(&self.signal_url)
                .header("Connect-Protocol-Version", "1")
                .json(&body);
            self.envd.authorize(request)
        };
        match remote::call(E2B, "signal command", request, |_| false).await {
            Ok(reply) if reply.status.is_success() => {}
            // The command ended first: nothing left to signal.
            Ok(reply) if reply.status == StatusCode::NOT_FOUND => {
                tracing::debug!(pid, signal = name, "e2b command already ended");
            }
            Ok(reply) => {
                let err = reply.error(E2B, "signal command");
                tracing::warn!(pid, signal = name, error = %err, "e2b signal refused");
            }
            Err(err) => tracing::warn!(pid, signal = name, error = %err, "e2b signal failed"),
        }
    }
}

impl ExecControl for SignalControl {
    fn interrupt(&self) {
        self.send(Signal::Term);
    }

    fn kill(&self) {
        self.send(Signal::Kill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(json: serde_json::Value) -> ExitStatus {
        exit_status(&serde_json::from_value(json).expect("end event"))
    }

    #[test]
    fn exit_codes_and_signals_are_read_from_the_end_event() {
        assert_eq!(
            end(json!({"exited": true, "status": "exit status 0"})),
            ExitStatus::Code(0)
        );
        assert_eq!(
            end(json!({"exitCode": 3, "exited": true, "status": "exit status 3"})),
            ExitStatus::Code(3)
        );
        assert_eq!(
            end(json!({"exitCode": -1, "status": "signal: killed"})),
            ExitStatus::Signal(libc::SIGKILL)
        );
        assert_eq!(
            end(json!({"exitCode": -1, "status": "signal: terminated"})),
            ExitStatus::Signal(libc::SIGTERM)
        );
    }

    #[test]
    fn a_user_is_named_only_to_envd_before_0_4() {
        assert!(envd_wants_user(Some("0.3.9")));
        assert!(envd_wants_user(None));
        assert!(envd_wants_user(Some("unknown")));
        assert!(!envd_wants_user(Some("0.4.0")));
        assert!(!envd_wants_user(Some("0.5.1-beta.2")));
        assert!(!envd_wants_user(Some("1.0.0")));
    }

    #[test]
    fn the_metadata_filter_escapes_each_pair_and_then_the_whole() {
        let labels = Labels::from([("k".to_owned(), "a&b=c".to_owned())]);
        // Pair: k=a%26b%3Dc; whole: k%3Da%2526b%253Dc.
        assert_eq!(metadata_filter(&labels), "k%3Da%2526b%253Dc");
    }

    #[test]
    fn envelopes_frame_their_length_big_endian() {
        let frame = envelope(END_STREAM_FLAG, &json!({}));
        assert_eq!(&frame[..], &[2, 0, 0, 0, 2, b'{', b'}']);
    }

    #[test]
    fn a_program_envd_cannot_start_is_an_invalid_request() {
        let err = ConnectError {
            code: "internal".into(),
            message: "exec: \"nope\": executable file not found in $PATH".into(),
        };
        assert!(matches!(
            err.into_provider_error("exec"),
            ProviderError::Invalid(_)
        ));
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
