//! The Daytona provider: sandboxes managed through the Daytona REST API
//! (`Authorization: Bearer <key>`), commands run through its toolbox
//! session API.
//!
//! Each command gets a session of its own, through the toolbox proxy the
//! sandbox names (`toolboxProxyUrl`; the API's `/toolbox/...` routes are
//! deprecated): `exec` in it with `runAsync`, the log and the exit code
//! polled until the command has ended (plain text: without an SDK version
//! the toolbox does not tell stdout from stderr, so every line is stdout);
//! then the session is deleted, with anything the command left running in
//! it. The log is polled, not followed: the toolbox follows a log only over
//! a WebSocket, and a held-open stream is cut by the proxy's idle timeout
//! in a command's quiet stretch; each poll rereads the log (the toolbox has
//! no offset), which costs in proportion to a chatty command's output.
//! Daytona cannot signal one command, so both interrupt and kill delete the
//! session, which ends its processes at once:
//! on Daytona, [`Process::terminate`] never waits out its grace. The session
//! API takes a shell command line, so argv is shell-quoted and the
//! environment goes in front as `env K=V ...`; a program that does not exist
//! therefore shows as exit code 127 with `env`'s message on the output, not
//! as an error of `exec`.
//!
//! Pause is Daytona's stop and resume its start; both wait until the
//! sandbox is in the state asked for, and both take "already there" as done
//! (Daytona answers 400 to stopping a stopped sandbox, 409 while a change of
//! state is in progress). Every API call is retried while its failure is
//! transient (see [`crate::remote`]), except a create: Daytona holds a
//! create up to 30 s until the sandbox runs, so a create gets a longer
//! timeout, carries a label of its own ([`crate::LABEL_CREATE`]), and after
//! a failure that leaves its fate unknown the sandbox is looked up by that
//! label before another create is sent.
//!
//! What this follows, from `daytonaio/daytona` at tag `v0.190.0` (read, not
//! copied: the repository is AGPL-3.0): `apps/api/src/sandbox/controllers/
//! sandbox.controller.ts` (create refuses `cpu`/`memory`/`disk` unless the
//! sandbox is built; create and start wait up to 30 s for `started`),
//! `dto/list-sandboxes-query.dto.ts` and `list-sandboxes-response.dto.ts`
//! (`GET /sandbox` is paged by `cursor`, `limit` 1..200, and answers
//! `{items, nextCursor}`), `services/sandbox.service.ts` (`stop` of a
//! sandbox not started: 400 "Sandbox is not in a stoppable state"; a state
//! change in progress: 409), `apps/proxy/pkg/proxy/get_sandbox_target.go`
//! (the toolbox proxy: 400 for a sandbox it cannot find),
//! `apps/daemon/pkg/session/log.go` (logs follow only over a WebSocket).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::remote::{self, Reply};
use crate::{
    CreateSpec, ExecControl, ExecSpec, Execution, ExitStatus, Health, KillOutcome, LABEL_CREATE,
    Labels, OutputLine, OutputStream, Process, Provider, ProviderError, SandboxInfo,
};

const DAYTONA: &str = "daytona";
/// How long a create waits for a sandbox that is not started yet.
const START_WAIT: Duration = Duration::from_secs(60);
/// How often a running command's log and exit code are read: at first and
/// while output comes, and at most while it does not.
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(1);
/// Creates sent before giving up (each after looking for the last one's
/// sandbox).
const CREATE_ATTEMPTS: u32 = 3;
/// Sandboxes a list page asks for (Daytona's maximum).
const LIST_PAGE: u32 = 200;

/// Where and how to reach Daytona. Defaults are Daytona's cloud; the API key
/// comes from the environment ([`DaytonaConfig::with_env_api_key`]).
#[derive(Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DaytonaConfig {
    /// Base URL of the Daytona API.
    pub api_url: String,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Snapshot sandboxes are created from; it sets their CPU, memory and
    /// disk (`daytona-small`, `daytona-medium`, `daytona-large`, or one of
    /// your organization's).
    pub snapshot: String,
    /// Minutes without activity before Daytona stops a sandbox (0: never),
    /// when [`CreateSpec::lifetime_secs`] is 0.
    pub auto_stop_minutes: u32,
    /// Minutes after a sandbox stopped (paused, or auto-stopped) before
    /// Daytona deletes it; negative: never. Not 0: Daytona deletes a
    /// sandbox with 0 as soon as it stops, and a pause is a stop.
    pub auto_delete_minutes: i32,
    /// How long one create request may take: Daytona answers once the
    /// sandbox runs, up to 30 s later.
    pub create_timeout_secs: u64,
}

impl Default for DaytonaConfig {
    fn default() -> DaytonaConfig {
        DaytonaConfig {
            api_url: "https://app.daytona.io/api".into(),
            api_key: String::new(),
            snapshot: "daytona-small".into(),
            auto_stop_minutes: 15,
            auto_delete_minutes: 24 * 60,
            create_timeout_secs: 75,
        }
    }
}

impl DaytonaConfig {
    /// Fills an empty `api_key` from `DAYTONA_API_KEY`.
    pub fn with_env_api_key(mut self) -> DaytonaConfig {
        self.api_key = remote::key_or_env(self.api_key, "DAYTONA_API_KEY");
        self
    }
}

/// Never prints the key.
impl fmt::Debug for DaytonaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaytonaConfig")
            .field("api_url", &self.api_url)
            .field("api_key", &remote::redacted(&self.api_key))
            .field("snapshot", &self.snapshot)
            .field("auto_stop_minutes", &self.auto_stop_minutes)
            .field("auto_delete_minutes", &self.auto_delete_minutes)
            .field("create_timeout_secs", &self.create_timeout_secs)
            .finish()
    }
}

/// Daytona sandboxes through Daytona's API and toolbox.
pub struct DaytonaProvider {
    api: Api,
    config: DaytonaConfig,
}

/// The authenticated HTTP side, cloned into the tasks that follow commands.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    auth: String,
}

impl Api {
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ProviderError> {
        self.call_url(what, method, &format!("{}{path}", self.base), body)
            .await
    }

    /// A call to a whole URL: the toolbox is reached through its proxy.
    async fn call_url(
        &self,
        what: &str,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, ProviderError> {
        let request = || {
            let request = self
                .http
                .request(method.clone(), url)
                .header("Authorization", &self.auth);
            match body {
                Some(body) => request.json(body),
                None => request,
            }
        };
        remote::call(DAYTONA, what, request, |_| false).await
    }
}

impl DaytonaProvider {
    /// Checks the configuration; connects lazily.
    pub fn new(config: DaytonaConfig) -> Result<DaytonaProvider, ProviderError> {
        if config.api_key.is_empty() {
            return Err(ProviderError::Invalid(
                "daytona: no api key: set DAYTONA_API_KEY or api_key".into(),
            ));
        }
        remote::check_url(DAYTONA, "api_url", &config.api_url)?;
        let api = Api {
            http: remote::http_client(DAYTONA)?,
            base: config.api_url.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", config.api_key),
        };
        Ok(DaytonaProvider { api, config })
    }

    async fn get(&self, sandbox_id: &str) -> Result<Option<SandboxBody>, ProviderError> {
        let path = format!("/sandbox/{}", remote::path_id(DAYTONA, sandbox_id)?);
        let reply = self
            .api
            .call("get sandbox", Method::GET, &path, None)
            .await?;
        match reply.status.as_u16() {
            200 => Ok(Some(reply.json(DAYTONA, "get sandbox")?)),
            404 | 410 => Ok(None),
            _ => Err(reply.error(DAYTONA, "get sandbox")),
        }
    }

    /// Waits out `creating`/`starting`: a sandbox is returned once it runs.
    async fn wait_started(&self, mut sandbox: SandboxBody) -> Result<SandboxBody, ProviderError> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            match sandbox.state.as_str() {
                "started" => return Ok(sandbox),
                state if is_dead(state) => {
                    return Err(ProviderError::Failed(format!(
                        "daytona: sandbox {} is {state} after create",
                        sandbox.id
                    )));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Transient(format!(
                    "daytona: sandbox {} still {} after {START_WAIT:?}",
                    sandbox.id, sandbox.state
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            sandbox = self
                .get(&sandbox.id)
                .await?
                .ok_or_else(|| ProviderError::NotFound(sandbox.id.clone()))?;
        }
    }

    /// A created sandbox once it runs, as [`Provider::create`] returns it.
    async fn created(
        &self,
        sandbox: SandboxBody,
        spec: &CreateSpec,
    ) -> Result<SandboxInfo, ProviderError> {
        let sandbox = self.wait_started(sandbox).await?;
        let mut info = sandbox.into_info();
        if info.labels.is_empty() {
            info.labels = spec.labels.clone();
        }
        if info.created_at_ms == 0 {
            info.created_at_ms = remote::now_ms();
        }
        Ok(info)
    }

    /// Every sandbox with `labels`, page by page (`cursor`, 200 a page).
    async fn list_bodies(&self, labels: &Labels) -> Result<Vec<SandboxBody>, ProviderError> {
        let mut found = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = reqwest::Url::parse(&format!("{}/sandbox", self.api.base))
                .map_err(|err| ProviderError::Invalid(format!("daytona: api_url: {err}")))?;
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("limit", &LIST_PAGE.to_string());
                if !labels.is_empty() {
                    let filter = serde_json::to_string(labels).expect("labels should serialize");
                    query.append_pair("labels", &filter);
                }
                if let Some(cursor) = &cursor {
                    query.append_pair("cursor", cursor);
                }
            }
            let request = || {
                self.api
                    .http
                    .get(url.clone())
                    .header("Authorization", &self.api.auth)
            };
            let reply = remote::call(DAYTONA, "list sandboxes", request, |_| false).await?;
            if reply.status != StatusCode::OK {
                return Err(reply.error(DAYTONA, "list sandboxes"));
            }
            let page: SandboxPage = reply.json(DAYTONA, "list sandboxes")?;
            found.extend(page.items);
            match page.next_cursor {
                Some(next) if !next.is_empty() && Some(&next) != cursor.as_ref() => {
                    cursor = Some(next)
                }
                _ => return Ok(found),
            }
        }
    }

    /// stop or start, then wait until the sandbox is `target` (`stopped`,
    /// `started`): Daytona answers before the change is done. "Not found"
    /// when it is gone; "already there" is done.
    async fn lifecycle(
        &self,
        sandbox_id: &str,
        action: &str,
        target: &str,
    ) -> Result<(), ProviderError> {
        let path = format!(
            "/sandbox/{}/{action}",
            remote::path_id(DAYTONA, sandbox_id)?
        );
        let what = format!("{action} sandbox");
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            let reply = self.api.call(&what, Method::POST, &path, None).await?;
            match reply.status.as_u16() {
                200..=299 => break,
                404 => return Err(ProviderError::NotFound(sandbox_id.to_owned())),
                // Another change of state is under way: let it finish.
                409 if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // "Not in a stoppable state": maybe already `target`.
                400 => match self.get(sandbox_id).await? {
                    None => return Err(ProviderError::NotFound(sandbox_id.to_owned())),
                    Some(sandbox) if sandbox.state == target => return Ok(()),
                    Some(sandbox) if is_dead(&sandbox.state) => {
                        return Err(ProviderError::NotFound(sandbox_id.to_owned()));
                    }
                    Some(_) => return Err(reply.error(DAYTONA, &what)),
                },
                _ => return Err(reply.error(DAYTONA, &what)),
            }
        }
        self.wait_state(sandbox_id, target, deadline).await
    }

    async fn wait_state(
        &self,
        sandbox_id: &str,
        target: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), ProviderError> {
        loop {
            let state = match self.get(sandbox_id).await? {
                None => return Err(ProviderError::NotFound(sandbox_id.to_owned())),
                Some(sandbox) => sandbox.state,
            };
            if state == target {
                return Ok(());
            }
            if is_dead(&state) {
                return Err(ProviderError::NotFound(sandbox_id.to_owned()));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::Transient(format!(
                    "daytona: sandbox {sandbox_id} still {state}, not {target}, after {START_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SandboxPage {
    #[serde(default)]
    items: Vec<SandboxBody>,
    #[serde(default)]
    next_cursor: Option<String>,
}

/// States from which a sandbox does not come back.
fn is_dead(state: &str) -> bool {
    matches!(state, "destroyed" | "destroying" | "error" | "build_failed")
}

#[async_trait::async_trait]
impl Provider for DaytonaProvider {
    fn name(&self) -> &'static str {
        "daytona"
    }

    async fn create(&self, spec: &CreateSpec) -> Result<SandboxInfo, ProviderError> {
        // Daytona has no lifetime, only an idle auto-stop: the closest bound.
        let auto_stop = match spec.lifetime_secs {
            0 => self.config.auto_stop_minutes,
            secs => u32::try_from(secs.div_ceil(60)).unwrap_or(u32::MAX),
        };
        let mut labels = spec.labels.clone();
        let create_id = uuid::Uuid::now_v7().simple().to_string();
        labels.insert(LABEL_CREATE.into(), create_id.clone());
        // No cpu/memory/disk: the snapshot sets them (Daytona refuses both).
        let body = json!({
            "snapshot": self.config.snapshot,
            "labels": labels,
            "autoStopInterval": auto_stop,
            "autoDeleteInterval": self.config.auto_delete_minutes,
        });
        let timeout = Duration::from_secs(self.config.create_timeout_secs.max(1));
        let mut last = String::new();
        for attempt in 0..CREATE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            let request = self
                .api
                .http
                .post(format!("{}/sandbox", self.api.base))
                .header("Authorization", &self.api.auth)
                .json(&body);
            let reply = remote::call_once(DAYTONA, "create sandbox", request, timeout).await;
            match reply {
                Ok(reply) if reply.status.is_success() => {
                    let created: SandboxBody = reply.json(DAYTONA, "create sandbox")?;
                    return self.created(created, spec).await;
                }
                Ok(reply) if !remote::transient_status(reply.status) => {
                    return Err(reply.error(DAYTONA, "create sandbox"));
                }
                Ok(reply) => last = reply.error(DAYTONA, "create sandbox").to_string(),
                Err(err) => last = err.to_string(),
            }
            // No answer, or a transient one: the create may have happened.
            // Adopt it rather than make a second sandbox.
            let mut mine = Labels::new();
            mine.insert(LABEL_CREATE.into(), create_id.clone());
            if let Ok(found) = self.list_bodies(&mine).await
                && let Some(sandbox) = found.into_iter().next()
            {
                tracing::info!(sandbox_id = %sandbox.id, "daytona create answered late: adopting the sandbox it made");
                return self.created(sandbox, spec).await;
            }
        }
        Err(ProviderError::Transient(format!(
            "daytona create sandbox: {CREATE_ATTEMPTS} attempts: {last}"
        )))
    }

    async fn exec(&self, sandbox_id: &str, spec: &ExecSpec) -> Result<Execution, ProviderError> {
        let sandbox = remote::path_id(DAYTONA, sandbox_id)?.to_string();
        let command = command_line(sandbox_id, spec)?;
        // The toolbox is reached through the proxy the sandbox names; a
        // sandbox that is not started cannot run anything.
        let found = self
            .get(sandbox_id)
            .await?
            .ok_or_else(|| ProviderError::NotFound(sandbox_id.to_owned()))?;
        if found.state != "started" {
            return Err(ProviderError::NotFound(sandbox_id.to_owned()));
        }
        let proxy = found.toolbox_proxy_url.ok_or_else(|| {
            ProviderError::Failed(format!(
                "daytona: sandbox {sandbox_id} has no toolboxProxyUrl"
            ))
        })?;
        let session = Session {
            api: self.api.clone(),
            base: format!("{}/{sandbox}/process/session", proxy.trim_end_matches('/')),
            id: format!("corral-{}", uuid::Uuid::now_v7().simple()),
            sandbox_id: sandbox_id.to_owned(),
        };
        session.open().await?;
        let cmd_id = match session.run(&command).await {
            Ok(cmd_id) => cmd_id,
            Err(err) => {
                session.close().await;
                return Err(err);
            }
        };
        let (tx, output) = mpsc::channel(256);
        let (exit_tx, exit) = watch::channel(None);
        let control = SessionControl {
            session: session.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        tokio::spawn(session.pump(cmd_id, tx, exit_tx));
        Ok(Execution {
            output,
            process: Process::new(exit, Box::new(control)),
        })
    }

    async fn kill(&self, sandbox_id: &str) -> Result<KillOutcome, ProviderError> {
        let path = format!("/sandbox/{}", remote::path_id(DAYTONA, sandbox_id)?);
        let reply = self
            .api
            .call("kill sandbox", Method::DELETE, &path, None)
            .await?;
        match reply.status.as_u16() {
            200..=299 => Ok(KillOutcome::Killed),
            404 | 410 => Ok(KillOutcome::AlreadyGone),
            _ => Err(reply.error(DAYTONA, "kill sandbox")),
        }
    }

    async fn pause(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        self.lifecycle(sandbox_id, "stop", "stopped").await
    }

    async fn resume(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        self.lifecycle(sandbox_id, "start", "started").await
    }

    async fn probe(&self, sandbox_id: &str) -> Result<Health, ProviderError> {
        match self.get(sandbox_id).await? {
            None => Ok(Health::Gone("daytona: sandbox not found".into())),
            Some(sandbox) if is_dead(&sandbox.state) => Ok(Health::Gone(format!(
                "daytona: sandbox is {}",
                sandbox.state
            ))),
            // started, stopped, and the states between them.
            Some(_) => Ok(Health::Healthy),
        }
    }

    async fn list(&self, labels: &Labels) -> Result<Vec<SandboxInfo>, ProviderError> {
        let mut found: Vec<SandboxInfo> = self
            .list_bodies(labels)
            .await?
            .into_iter()
            .filter(|s| !is_dead(&s.state))
            .map(SandboxBody::into_info)
            // The reaper kills what this returns: never trust the filter alone.
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SandboxBody {
    id: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    created_at: Option<String>,
    /// Where the sandbox's toolbox is reached: `{toolboxProxyUrl}/{id}/...`.
    #[serde(default)]
    toolbox_proxy_url: Option<String>,
}

impl SandboxBody {
    fn into_info(self) -> SandboxInfo {
        SandboxInfo {
            created_at_ms: remote::rfc3339_ms(self.created_at.as_deref()),
            paused: self.state == "stopped",
            labels: self.labels.unwrap_or_default(),
            id: self.id,
        }
    }
}

/// `env 'K=V' ... 'argv0' 'argv1' ...`: the session runs a shell command line.
fn command_line(sandbox_id: &str, spec: &ExecSpec) -> Result<String, ProviderError> {
    let Some(program) = spec.argv.first() else {
        return Err(ProviderError::Invalid("empty argv".into()));
    };
    if program.contains('=') {
        // `env` would take it for an assignment.
        return Err(ProviderError::Invalid(format!(
            "daytona: program {program:?} contains '='"
        )));
    }
    let mut env = spec.env.clone();
    env.entry("CORRAL_SANDBOX_ID".into())
        .or_insert_with(|| sandbox_id.to_owned());
    let mut words = vec!["env".to_owned()];
    for (name, value) in &env {
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(ProviderError::Invalid(format!(
                "daytona: bad environment variable name {name:?}"
            )));
        }
        words.push(shell_quote(&format!("{name}={value}")));
    }
    words.extend(spec.argv.iter().map(|arg| shell_quote(arg)));
    // A session command's stdin is a pipe Daytona keeps open: a command
    // that reads it would wait for ever.
    words.push("</dev/null".to_owned());
    Ok(words.join(" "))
}

/// One word for a POSIX shell, whatever it contains.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The toolbox session one command runs in.
#[derive(Clone)]
struct Session {
    api: Api,
    /// `{toolboxProxyUrl}/{sandbox}/process/session`
    base: String,
    id: String,
    sandbox_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecReply {
    cmd_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommandReply {
    #[serde(default)]
    exit_code: Option<i32>,
}

impl Session {
    /// A toolbox refusal that means the sandbox is gone. The toolbox proxy
    /// answers a sandbox it cannot find with 400 "failed to get sandbox
    /// public status: ..." (`apps/proxy/pkg/proxy/get_sandbox_target.go`);
    /// the deprecated API route answered 400 "Sandbox is not running".
    fn not_found(&self, reply: &Reply, what: &str) -> ProviderError {
        if sandbox_unreachable(reply) {
            ProviderError::NotFound(self.sandbox_id.clone())
        } else {
            reply.error(DAYTONA, what)
        }
    }

    async fn open(&self) -> Result<(), ProviderError> {
        let body = json!({ "sessionId": self.id });
        let reply = self
            .api
            .call_url("create session", Method::POST, &self.base, Some(&body))
            .await?;
        if !reply.status.is_success() {
            return Err(self.not_found(&reply, "create session"));
        }
        Ok(())
    }

    async fn run(&self, command: &str) -> Result<String, ProviderError> {
        let path = format!("{}/{}/exec", self.base, self.id);
        let body = json!({ "command": command, "runAsync": true });
        let reply = self
            .api
            .call_url("exec", Method::POST, &path, Some(&body))
            .await?;
        if !reply.status.is_success() {
            return Err(self.not_found(&reply, "exec"));
        }
        Ok(reply.json::<ExecReply>(DAYTONA, "exec")?.cmd_id)
    }

    /// The command's whole log so far: `Ok(None)` once the session (or the
    /// sandbox) is gone. Without a WebSocket upgrade the toolbox answers the
    /// log as it is and does not follow it, whatever `follow` says
    /// (`apps/daemon/pkg/session/log.go`); sent no SDK version, it answers
    /// plain text, stdout and stderr combined.
    async fn logs(&self, cmd_id: &str) -> Result<Option<bytes::Bytes>, ProviderError> {
        let path = format!("{}/{}/command/{cmd_id}/logs", self.base, self.id);
        let reply = self
            .api
            .call_url("read logs", Method::GET, &path, None)
            .await?;
        match reply.status.as_u16() {
            200 => Ok(Some(reply.body)),
            404 | 410 => Ok(None),
            _ if sandbox_unreachable(&reply) => Ok(None),
            _ => Err(reply.error(DAYTONA, "read logs")),
        }
    }

    /// Deletes the session, ending whatever runs in it. Best effort: a
    /// session of a sandbox that is gone is gone too.
    async fn close(&self) {
        let path = format!("{}/{}", self.base, self.id);
        match self
            .api
            .call_url("delete session", Method::DELETE, &path, None)
            .await
        {
            Ok(reply) if reply.status.is_success() || reply.status.as_u16() == 404 => {}
            Ok(reply) => {
                let err = reply.error(DAYTONA, "delete session");
                tracing::warn!(sandbox_id = %self.sandbox_id, error = %err, "daytona session not deleted");
            }
            Err(err) => {
                tracing::warn!(sandbox_id = %self.sandbox_id, error = %err, "daytona session not deleted");
            }
        }
    }

    /// The command's exit code: `Ok(None)` while it runs, `Err(())` once the
    /// session (or the sandbox) is gone and with it the code.
    async fn exit_code(&self, cmd_id: &str) -> Result<Option<i32>, ()> {
        let path = format!("{}/{}/command/{cmd_id}", self.base, self.id);
        match self
            .api
            .call_url("get command", Method::GET, &path, None)
            .await
        {
            Ok(reply) if reply.status.is_success() => {
                match reply.json::<CommandReply>(DAYTONA, "get command") {
                    Ok(command) => Ok(command.exit_code),
                    Err(err) => {
                        tracing::warn!(sandbox_id = %self.sandbox_id, error = %err, "daytona command status unreadable");
                        Err(())
                    }
                }
            }
            Ok(reply) if matches!(reply.status.as_u16(), 404 | 410) => Err(()),
            Ok(reply) if sandbox_unreachable(&reply) => Err(()),
            Ok(reply) => {
                let err = reply.error(DAYTONA, "get command");
                tracing::warn!(sandbox_id = %self.sandbox_id, error = %err, "daytona command status refused");
                Err(())
            }
            // Still unreachable after the retries: ask again later.
            Err(_) => Ok(None),
        }
    }

    /// Output lines as the log grows, then the exit code. The log is read
    /// again on every poll and what was sent already skipped: each read is
    /// a short request, so no idle timeout of a proxy can cut the output
    /// short, whatever the command's quiet stretches. Polls come every
    /// [`POLL_MIN`] while output comes and slow to [`POLL_MAX`] while it does
    /// not. The exit code is asked for before each read, so the read after
    /// the code is known holds the whole log. A command whose code cannot be
    /// had (its session was deleted: interrupt or kill) ended by SIGKILL.
    async fn pump(
        self,
        cmd_id: String,
        tx: mpsc::Sender<OutputLine>,
        exit: watch::Sender<Option<ExitStatus>>,
    ) {
        let mut lines = remote::Lines::default();
        let mut sent = 0usize;
        let mut pause = POLL_MIN;
        let status = loop {
            let code = self.exit_code(&cmd_id).await;
            match self.logs(&cmd_id).await {
                Ok(Some(log)) if log.len() > sent => {
                    for line in lines.push(&log[sent..]) {
                        send(&tx, line).await;
                    }
                    sent = log.len();
                    pause = POLL_MIN;
                }
                Ok(_) => pause = (pause * 2).min(POLL_MAX),
                Err(err) => {
                    tracing::warn!(sandbox_id = %self.sandbox_id, error = %err, "daytona logs unreadable");
                    pause = POLL_MAX;
                }
            }
            match code {
                Ok(Some(code)) => break ExitStatus::Code(code),
                Err(()) => break ExitStatus::Signal(libc::SIGKILL),
                Ok(None) => tokio::time::sleep(pause).await,
            }
        };
        if let Some(line) = lines.finish() {
            send(&tx, line).await;
        }
        drop(tx);
        let _ = exit.send(Some(status));
        self.close().await;
    }
}

/// Whether a toolbox answer means the sandbox cannot be reached: gone or
/// not started. Through the toolbox proxy a sandbox it cannot find is 400
/// "failed to get sandbox public status" / "failed to get runner info"
/// (`apps/proxy/pkg/proxy/get_sandbox_target.go`); the deprecated route's
/// 400 "Sandbox is not running" is taken too.
fn sandbox_unreachable(reply: &Reply) -> bool {
    if reply.status != StatusCode::BAD_REQUEST {
        return false;
    }
    let text = reply.text().to_ascii_lowercase();
    [
        "not running",
        "failed to get sandbox",
        "failed to get runner",
    ]
    .iter()
    .any(|phrase| text.contains(phrase))
}

async fn send(tx: &mpsc::Sender<OutputLine>, line: String) {
    // A reader that went away still needs the exit: keep going.
    let _ = tx
        .send(OutputLine {
            stream: OutputStream::Stdout,
            line,
        })
        .await;
}

/// Ends a command by deleting its session: Daytona has no signals for a
/// single command, so interrupt is as final as kill.
struct SessionControl {
    session: Session,
    runtime: tokio::runtime::Handle,
}

impl SessionControl {
    fn end(&self) {
        let session = self.session.clone();
        self.runtime.spawn(async move { session.close().await });
    }
}

impl ExecControl for SessionControl {
    fn interrupt(&self) {
        self.end();
    }

    fn kill(&self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_quotes_every_word_and_carries_the_environment() {
        let spec = ExecSpec {
            argv: vec!["sh".into(), "-c".into(), "echo 'hi'; exit 3".into()],
            env: BTreeMap::from([("GREETING".into(), "it's me".into())]),
        };
        assert_eq!(
            command_line("sbx1", &spec).expect("command line"),
            r#"env 'CORRAL_SANDBOX_ID=sbx1' 'GREETING=it'\''s me' 'sh' '-c' 'echo '\''hi'\''; exit 3' </dev/null"#
        );
    }

    #[test]
    fn an_environment_name_the_shell_cannot_take_is_refused() {
        let spec = ExecSpec {
            argv: vec!["true".into()],
            env: BTreeMap::from([("A B".into(), "x".into())]),
        };
        assert!(matches!(
            command_line("sbx1", &spec),
            Err(ProviderError::Invalid(_))
        ));
    }

    #[test]
    fn the_config_never_prints_its_key() {
        let config = DaytonaConfig {
            api_key: "secret".into(),
            ..DaytonaConfig::default()
        };
        assert!(!format!("{config:?}").contains("secret"));
    }
}
