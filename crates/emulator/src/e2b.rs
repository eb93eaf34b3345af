//! The E2B emulator: the sandbox REST API (`X-API-Key`) and, under
//! `/envd/{sandbox_id}`, each sandbox's envd `process.Process` Connect
//! service (`Start` streaming JSON envelopes, `SendSignal` unary).
//!
//! As on E2B (`e2b-dev/infra`: `spec/openapi.yml`, the client proxy, envd's
//! `process.proto` and handlers), an expired or killed sandbox answers 404
//! on the API and, on envd, 502 `{"sandboxId", "message": "The sandbox was
//! not found", "code": 502}` (`packages/shared/pkg/proxy/template/
//! sandbox_not_found.go`); paused sandboxes do not time out; a sandbox gets
//! an envd access token only when created with `secure: true`, and envd then
//! wants it in `X-Access-Token`; a command runs through `/bin/sh -c 'exec
//! "$@"'`, so a program that does not exist exits 127 with the shell's
//! message on stderr. `StartRequest.stdin` defaults to true on envd (the
//! command's stdin stays open); the emulator gives every command /dev/null
//! but counts the starts that did not ask for `stdin: false`
//! ([`E2bEmulator::open_stdin_starts`]). Not emulated: `autoPause` (an expiry
//! always kills), a command's `cwd` (it runs in the sandbox's work
//! directory), PTYs, and envd's keepalive messages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use corral_provider::{
    ExecSpec, ExitStatus, Labels, OutputLine, OutputStream, Process, Provider, ProviderError,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Server;
use crate::faults::{self, Faults};
use crate::sandboxes::{Lookup, Sandbox, Sandboxes};

/// E2B's timeout when a create names none, seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 15;
const END_STREAM: u8 = 0x02;
/// Synthetic pids (for a command whose process reports no pid) count down
/// from here, far above real pids.
const SYNTHETIC_PIDS: u32 = u32::MAX / 2;

/// An emulated E2B, stopped when dropped.
pub struct E2bEmulator {
    server: Server,
    state: Arc<E2bState>,
}

impl E2bEmulator {
    /// Starts on a free port; sandboxes live under `home`.
    pub async fn start(home: &Path) -> std::io::Result<E2bEmulator> {
        let state = Arc::new(E2bState {
            sandboxes: Sandboxes::start(home)?,
            faults: Arc::new(Faults::default()),
            page_size: AtomicUsize::new(100),
            next_synthetic_pid: AtomicU32::new(SYNTHETIC_PIDS),
            open_stdin_starts: AtomicUsize::new(0),
        });
        let server = Server::start(router(state.clone())).await?;
        Ok(E2bEmulator { server, state })
    }

    /// The API's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The envd URL template: `http://127.0.0.1:PORT/envd/{sandbox_id}`.
    pub fn envd_url(&self) -> String {
        format!("{}/envd/{{sandbox_id}}", self.server.url())
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// As if the sandbox's timeout passed: killed, then 404.
    pub fn expire(&self, sandbox_id: &str) {
        self.state.sandboxes.expire(sandbox_id);
    }

    /// Ids of the live sandboxes.
    pub fn sandbox_ids(&self) -> Vec<String> {
        self.state.sandboxes.live_ids()
    }

    /// How many creates succeeded server-side, lost responses included.
    pub fn created(&self) -> usize {
        self.state.sandboxes.created()
    }

    /// Commands started without asking for `stdin: false`.
    pub fn open_stdin_starts(&self) -> usize {
        self.state.open_stdin_starts.load(Ordering::SeqCst)
    }

    /// Whether the sandbox was created `secure` (envd wants its token).
    pub fn is_secure(&self, sandbox_id: &str) -> bool {
        matches!(
            self.state
                .sandboxes
                .with(sandbox_id, |s| s.api.token.is_some()),
            Lookup::Live(true)
        )
    }

    /// Caps the page size of `GET /v2/sandboxes`, to exercise pagination.
    pub fn set_page_size(&self, n: usize) {
        self.state.page_size.store(n.max(1), Ordering::SeqCst);
    }
}

struct E2bState {
    sandboxes: Arc<Sandboxes<E2bSandbox>>,
    faults: Arc<Faults>,
    page_size: AtomicUsize,
    next_synthetic_pid: AtomicU32,
    /// Commands started without `stdin: false` (envd would leave their
    /// stdin open).
    open_stdin_starts: AtomicUsize,
}

struct E2bSandbox {
    template: String,
    /// envd's access token: only for a sandbox created `secure`.
    token: Option<String>,
    commands: HashMap<u32, Command>,
}

struct Command {
    /// The process group the command runs in.
    pgid: Option<i32>,
    process: Arc<Process>,
}

type Shared = State<Arc<E2bState>>;

/// The API under the key check, envd under the token check, all under the
/// faults.
fn router(state: Arc<E2bState>) -> Router {
    let api = Router::new()
        .route("/sandboxes", post(create))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/v2/sandboxes", get(list))
        .layer(middleware::from_fn(require_api_key));
    let envd = Router::new()
        .route("/envd/{id}/process.Process/Start", post(start))
        .route("/envd/{id}/process.Process/SendSignal", post(send_signal));
    api.merge(envd)
        .layer(middleware::from_fn_with_state(
            state.faults.clone(),
            faults::inject,
        ))
        .with_state(state)
}

async fn require_api_key(request: Request, next: Next) -> Response {
    let has_key = request
        .headers()
        .get("x-api-key")
        .is_some_and(|key| !key.is_empty());
    if !has_key {
        return error(StatusCode::UNAUTHORIZED, "missing X-API-Key");
    }
    next.run(request).await
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "code": status.as_u16(), "message": message });
    (status, axum::Json(body)).into_response()
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("sandbox \"{id}\" not found"),
    )
}

fn failed(err: ProviderError) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Labels,
    #[serde(default)]
    secure: bool,
}

#[derive(Deserialize)]
struct Timeout {
    timeout: Option<u64>,
}

fn lifetime(secs: Option<u64>) -> Option<Duration> {
    Some(Duration::from_secs(secs.unwrap_or(DEFAULT_TIMEOUT_SECS)))
}

/// The body of a create and of a connect.
fn created(sandbox: &Sandbox<E2bSandbox>) -> Value {
    json!({
        "sandboxID": sandbox.id,
        "templateID": sandbox.api.template,
        "clientID": "emulator",
        "envdVersion": "0.2.0",
        "envdAccessToken": sandbox.api.token,
        "domain": null,
    })
}

fn described(sandbox: &Sandbox<E2bSandbox>) -> Value {
    json!({
        "sandboxID": sandbox.id,
        "templateID": sandbox.api.template,
        "clientID": "emulator",
        "metadata": sandbox.labels,
        "state": if sandbox.paused { "paused" } else { "running" },
        "startedAt": sandbox.started_at.to_rfc3339(),
        "endAt": sandbox.end_at().map(|t| t.to_rfc3339()),
        "cpuCount": 2,
        "memoryMB": 512,
        "envdVersion": "0.2.0",
        "envdAccessToken": sandbox.api.token,
    })
}

async fn create(State(state): Shared, axum::Json(body): axum::Json<NewSandbox>) -> Response {
    if let Some(refused) = state.faults.take_refused_create() {
        return refused;
    }
    let api = E2bSandbox {
        template: body.template_id.unwrap_or_else(|| "base".into()),
        token: body
            .secure
            .then(|| uuid::Uuid::now_v7().simple().to_string()),
        commands: HashMap::new(),
    };
    let sandboxes = &state.sandboxes;
    let id = match sandboxes
        .create(body.metadata, lifetime(body.timeout), api)
        .await
    {
        Ok(id) => id,
        Err(err) => return failed(err),
    };
    if state.faults.take_lost_create() {
        return error(StatusCode::BAD_GATEWAY, "injected fault: response lost");
    }
    match sandboxes.with(&id, |s| created(s)) {
        Lookup::Live(body) => (StatusCode::CREATED, axum::Json(body)).into_response(),
        _ => not_found(&id),
    }
}

async fn detail(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    match state.sandboxes.with(&id, |s| described(s)) {
        Lookup::Live(body) => axum::Json(body).into_response(),
        Lookup::Expired | Lookup::Unknown => not_found(&id),
    }
}

async fn kill(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    match state.sandboxes.kill(&id).await {
        Lookup::Live(()) => StatusCode::NO_CONTENT.into_response(),
        Lookup::Expired | Lookup::Unknown => not_found(&id),
    }
}

async fn pause(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let was_paused = match state
        .sandboxes
        .with(&id, |s| std::mem::replace(&mut s.paused, true))
    {
        Lookup::Live(was_paused) => was_paused,
        Lookup::Expired | Lookup::Unknown => return not_found(&id),
    };
    if was_paused {
        return error(StatusCode::CONFLICT, "sandbox is already paused");
    }
    match state.sandboxes.local().pause(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => failed(err),
    }
}

/// Resumes a paused sandbox (201) or just extends a running one's timeout (200).
async fn connect(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    axum::Json(body): axum::Json<Timeout>,
) -> Response {
    let found = state.sandboxes.with(&id, |s| {
        s.expire_in(lifetime(body.timeout));
        (std::mem::replace(&mut s.paused, false), created(s))
    });
    let (was_paused, body) = match found {
        Lookup::Live(found) => found,
        Lookup::Expired | Lookup::Unknown => return not_found(&id),
    };
    if !was_paused {
        return axum::Json(body).into_response();
    }
    match state.sandboxes.local().resume(&id).await {
        Ok(()) => (StatusCode::CREATED, axum::Json(body)).into_response(),
        Err(err) => failed(err),
    }
}

async fn set_timeout(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    axum::Json(body): axum::Json<Timeout>,
) -> Response {
    match state
        .sandboxes
        .with(&id, |s| s.expire_in(lifetime(body.timeout)))
    {
        Lookup::Live(()) => StatusCode::NO_CONTENT.into_response(),
        Lookup::Expired | Lookup::Unknown => not_found(&id),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    /// `k1=v1&k2=v2`, url-encoded as one value.
    metadata: Option<String>,
    /// Comma-separated states; all when absent.
    state: Option<String>,
    limit: Option<usize>,
    /// The id to start after.
    next_token: Option<String>,
}

async fn list(State(state): Shared, Query(query): Query<ListQuery>) -> Response {
    let wanted: Labels = query
        .metadata
        .as_deref()
        .map(|m| form_urlencoded::parse(m.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let states: Option<HashSet<String>> = query
        .state
        .as_deref()
        .map(|s| s.split(',').map(str::to_owned).collect());
    let limit = query
        .limit
        .unwrap_or(100)
        .min(state.page_size.load(Ordering::SeqCst))
        .max(1);
    let after = query.next_token.unwrap_or_default();
    let mut matching = state.sandboxes.list(|s| {
        let state_name = if s.paused { "paused" } else { "running" };
        let wanted_state = states.as_ref().is_none_or(|set| set.contains(state_name));
        let labelled = wanted.iter().all(|(k, v)| s.labels.get(k) == Some(v));
        (s.id > after && wanted_state && labelled).then(|| (s.id.clone(), described(s)))
    });
    let more = matching.len() > limit;
    matching.truncate(limit);
    let mut response =
        axum::Json(matching.iter().map(|(_, v)| v).collect::<Vec<_>>()).into_response();
    if more
        && let Some((last, _)) = matching.last()
        && let Ok(value) = last.parse()
    {
        response.headers_mut().insert("x-next-token", value);
    }
    response
}

/// What envd answers for a sandbox the proxy cannot reach.
fn proxy_not_found(id: &str) -> Response {
    let body = json!({ "sandboxId": id, "message": "The sandbox was not found", "code": 502 });
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

fn connect_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message })),
    )
        .into_response()
}

/// The envd token check: `Some(response)` refuses the request.
fn check_token(state: &E2bState, id: &str, headers: &HeaderMap) -> Option<Response> {
    let given = headers.get("x-access-token").and_then(|t| t.to_str().ok());
    match state.sandboxes.with(id, |s| match &s.api.token {
        Some(token) => given == Some(token.as_str()),
        None => true,
    }) {
        Lookup::Live(true) => None,
        Lookup::Live(false) => Some(connect_error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing or wrong X-Access-Token",
        )),
        Lookup::Expired | Lookup::Unknown => Some(proxy_not_found(id)),
    }
}

#[derive(Deserialize)]
struct StartRequest {
    process: ProcessConfig,
    stdin: Option<bool>,
}

#[derive(Deserialize)]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
}

/// One Connect envelope around `message`.
fn envelope(flags: u8, message: &Value) -> Bytes {
    let json = message.to_string().into_bytes();
    let mut frame = Vec::with_capacity(5 + json.len());
    frame.push(flags);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Bytes::from(frame)
}

/// The single envelope of a client-streaming request body.
fn unwrap_envelope(body: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(body.get(1..5)?.try_into().ok()?) as usize;
    body.get(5..5 + len)
}

async fn start(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refusal) = check_token(&state, &id, &headers) {
        return refusal;
    }
    let request: StartRequest = match unwrap_envelope(&body).map(serde_json::from_slice) {
        Some(Ok(request)) => request,
        _ => {
            let message = "expected one connect+json envelope";
            return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", message);
        }
    };
    if request.stdin != Some(false) {
        state.open_stdin_starts.fetch_add(1, Ordering::SeqCst);
    }
    // As envd does: through a shell, so a missing program exits 127.
    let spec = ExecSpec {
        argv: ["/bin/sh", "-c", "exec \"$@\"", "sh"]
            .into_iter()
            .map(str::to_owned)
            .chain(std::iter::once(request.process.cmd))
            .chain(request.process.args)
            .collect(),
        env: request.process.envs,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    match launch(&state, &id, &spec).await {
        Ok((pid, output, process)) => {
            tokio::spawn(stream_execution(pid, output, process, tx));
        }
        Err(err) => {
            let code = match err {
                ProviderError::NotFound(_) => "not_found",
                ProviderError::Invalid(_) => "invalid_argument",
                _ => "internal",
            };
            let end = json!({ "error": { "code": code, "message": err.to_string() } });
            let _ = tx.send(envelope(END_STREAM, &end)).await;
        }
    }
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(body))
        .expect("a streaming response should build")
}

/// Starts the command; its pid is its process group's.
async fn launch(
    state: &E2bState,
    id: &str,
    spec: &ExecSpec,
) -> Result<(u32, mpsc::Receiver<OutputLine>, Arc<Process>), ProviderError> {
    let execution = state.sandboxes.local().exec(id, spec).await?;
    let pgid = execution.process.pid();
    let pid = match pgid {
        Some(pgid) => pgid as u32,
        None => state.next_synthetic_pid.fetch_sub(1, Ordering::SeqCst),
    };
    let process = Arc::new(execution.process);
    let command = Command {
        pgid,
        process: process.clone(),
    };
    state
        .sandboxes
        .with(id, |s| s.api.commands.insert(pid, command));
    Ok((pid, execution.output, process))
}

/// Start event, output chunks, end event, end of stream.
async fn stream_execution(
    pid: u32,
    mut output: mpsc::Receiver<OutputLine>,
    process: Arc<Process>,
    tx: mpsc::Sender<Bytes>,
) {
    let message = |event: Value| envelope(0, &json!({ "event": event }));
    // A client that went away does not stop the command: keep draining.
    let _ = tx.send(message(json!({ "start": { "pid": pid } }))).await;
    while let Some(line) = output.recv().await {
        let chunk = base64::engine::general_purpose::STANDARD.encode(format!("{}\n", line.line));
        let data = match line.stream {
            OutputStream::Stdout => json!({ "stdout": chunk }),
            OutputStream::Stderr => json!({ "stderr": chunk }),
        };
        let _ = tx.send(message(json!({ "data": data }))).await;
    }
    let end = match process.wait().await {
        ExitStatus::Code(code) => {
            json!({ "exitCode": code, "exited": true, "status": format!("exit status {code}") })
        }
        ExitStatus::Signal(signal) => {
            json!({ "exitCode": -1, "exited": false, "status": format!("signal: {}", signal_name(signal)) })
        }
    };
    let _ = tx.send(message(json!({ "end": end }))).await;
    let _ = tx.send(envelope(END_STREAM, &json!({}))).await;
}

/// Go's names for the signals an agent usually dies of.
fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "terminated",
        libc::SIGINT => "interrupt",
        libc::SIGHUP => "hangup",
        libc::SIGSEGV => "segmentation fault",
        _ => "killed",
    }
}

#[derive(Deserialize)]
struct SignalRequest {
    process: Selector,
    signal: String,
}

#[derive(Deserialize)]
struct Selector {
    pid: u32,
}

async fn send_signal(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<SignalRequest>,
) -> Response {
    if let Some(refusal) = check_token(&state, &id, &headers) {
        return refusal;
    }
    let signal = match request.signal.as_str() {
        "SIGNAL_SIGTERM" => libc::SIGTERM,
        "SIGNAL_SIGKILL" => libc::SIGKILL,
        other => {
            let message = format!("unsupported signal {other:?}");
            return connect_error(StatusCode::BAD_REQUEST, "invalid_argument", &message);
        }
    };
    let target = state.sandboxes.with(&id, |s| {
        s.api
            .commands
            .get(&request.process.pid)
            .filter(|c| c.process.status().is_none())
            .map(|c| c.pgid)
    });
    match target {
        Lookup::Live(Some(pgid)) => {
            if let Some(pgid) = pgid {
                // SAFETY: killpg has no memory-safety preconditions.
                unsafe { libc::killpg(pgid, signal) };
            }
            axum::Json(json!({})).into_response()
        }
        Lookup::Live(None) => {
            connect_error(StatusCode::NOT_FOUND, "not_found", "process not found")
        }
        Lookup::Expired | Lookup::Unknown => proxy_not_found(&id),
    }
}
