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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
use crate::record::Recorder;
use crate::sandboxes::{Lookup, Sandbox, Sandboxes};

/// E2B's timeout when a create names none, seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 15;
const END_STREAM: u8 = 0x02;
/// envd starts a command as a plain child of its own (`exec.Cmd` without
/// `Setpgid`): in envd's process group, not the lead of one. The emulator's
/// sandboxes start each command as the lead of a group, so the launcher runs
/// the command as its child, says the child's pid on stderr first, waits for
/// it, and ends as it ended (by the same signal, if a signal ended it; an
/// exit code over 128 is taken for a signal). The inner shell is envd's
/// `/bin/sh -c '... exec "$@"'` wrapper.
const LAUNCHER: &str = r#"/bin/sh -c 'exec "$@"' sh "$@" &
child=$!
echo "corral-emulator-pid:$child" >&2
wait "$child"
status=$?
if [ "$status" -gt 128 ]; then kill -s "$((status - 128))" $$; fi
exit "$status""#;
const PID_MARKER: &str = "corral-emulator-pid:";
/// The envd version the emulator reports: one that wants no user named
/// (the SDK names `user` only to envd older than 0.4.0).
const ENVD_VERSION: &str = "0.4.2";

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
            user_starts: AtomicUsize::new(0),
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

    /// Records every request and answer from [`Recorder::start`] on.
    pub fn recorder(&self) -> &Recorder {
        &self.server.recorder
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

    /// Commands started with a user named in `Authorization`.
    pub fn user_starts(&self) -> usize {
        self.state.user_starts.load(Ordering::SeqCst)
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
    /// Commands started naming a user (Basic auth), which envd 0.4 and
    /// later do not need.
    user_starts: AtomicUsize,
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
    /// The command's own pid: not the lead of a process group.
    pid: i32,
    /// The launcher's process.
    process: Arc<Process>,
    /// Set by SIGTERM or SIGKILL: no more output is sent.
    output_cancelled: Arc<AtomicBool>,
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
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sandbox.api.token,
        "domain": null,
    })
}

/// A sandbox as `GET /v2/sandboxes` lists it (`ListedSandbox`: no envd
/// token).
fn listed(sandbox: &Sandbox<E2bSandbox>) -> Value {
    json!({
        "sandboxID": sandbox.id,
        "templateID": sandbox.api.template,
        "clientID": "emulator",
        "metadata": sandbox.labels,
        "state": if sandbox.paused { "paused" } else { "running" },
        "startedAt": sandbox.started_at.to_rfc3339(),
        "endAt": sandbox.end_at().unwrap_or(sandbox.started_at).to_rfc3339(),
        "cpuCount": 2,
        "memoryMB": 512,
        "diskSizeMB": 1024,
        "envdVersion": ENVD_VERSION,
    })
}

/// A sandbox as `GET /sandboxes/{id}` describes it (`SandboxDetail`: with
/// its envd token).
fn described(sandbox: &Sandbox<E2bSandbox>) -> Value {
    let mut detail = listed(sandbox);
    if let Some(token) = &sandbox.api.token {
        detail["envdAccessToken"] = json!(token);
    }
    detail
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
    let wanted: Labels = match query.metadata.as_deref().map(parse_metadata) {
        None => Labels::new(),
        Some(Some(wanted)) => wanted,
        Some(None) => return error(StatusCode::BAD_REQUEST, "error parsing metadata"),
    };
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
        (s.id > after && wanted_state && labelled).then(|| (s.id.clone(), listed(s)))
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

/// The `metadata` filter as E2B's API reads it (`packages/api/internal/
/// utils/sandboxes_list.go`, `parseFilters`): the query value, already
/// decoded once, is unescaped whole, split at `&` and `=`, and each key and
/// value unescaped again. A key or value holding `% + & =` therefore
/// matches only when escaped twice before the query's own encoding.
fn parse_metadata(query: &str) -> Option<Labels> {
    let query = query_unescape(query)?;
    let mut filters = Labels::new();
    for filter in query.split('&') {
        let parts: Vec<&str> = filter.split('=').collect();
        let [key, value] = parts[..] else {
            return None;
        };
        filters.insert(query_unescape(key)?, query_unescape(value)?);
    }
    Some(filters)
}

/// Go's `url.QueryUnescape`: `+` is a space, `%XX` a byte; a malformed
/// escape or bytes that are not UTF-8 are refused.
fn query_unescape(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        match first {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
                continue;
            }
            other => bytes.push(other),
        }
        rest = tail;
    }
    String::from_utf8(bytes).ok()
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
    if headers.contains_key(header::AUTHORIZATION) {
        state.user_starts.fetch_add(1, Ordering::SeqCst);
    }
    // As envd does: through a shell, so a missing program exits 127; the
    // launcher around it keeps the command out of the lead of a process
    // group, as envd's children are (see [`LAUNCHER`]).
    let spec = ExecSpec {
        argv: ["/bin/sh", "-c", LAUNCHER, "sh"]
            .into_iter()
            .map(str::to_owned)
            .chain(std::iter::once(request.process.cmd))
            .chain(request.process.args)
            .collect(),
        env: request.process.envs,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    match launch(&state, &id, &spec).await {
        Ok((pid, launched)) => {
            tokio::spawn(stream_execution(pid, launched, tx));
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

/// Starts the command and learns its pid from the launcher's first line.
async fn launch(
    state: &E2bState,
    id: &str,
    spec: &ExecSpec,
) -> Result<(u32, Launched), ProviderError> {
    let mut execution = state.sandboxes.local().exec(id, spec).await?;
    let mut early = Vec::new();
    let pid = loop {
        match execution.output.recv().await {
            Some(line) => match line.line.strip_prefix(PID_MARKER) {
                Some(pid) if line.stream == OutputStream::Stderr => match pid.parse::<i32>() {
                    Ok(pid) => break pid,
                    Err(_) => early.push(line),
                },
                _ => early.push(line),
            },
            None => {
                // The launcher died before it could say: nothing runs.
                let status = execution.process.wait().await;
                return Err(ProviderError::Failed(format!(
                    "emulated envd: the launcher ended ({status:?}) before the command started"
                )));
            }
        }
    };
    let process = Arc::new(execution.process);
    let output_cancelled = Arc::new(AtomicBool::new(false));
    let command = Command {
        pid,
        process: process.clone(),
        output_cancelled: output_cancelled.clone(),
    };
    state
        .sandboxes
        .with(id, |s| s.api.commands.insert(pid as u32, command));
    let launched = Launched {
        early,
        output: execution.output,
        process,
        output_cancelled,
    };
    Ok((pid as u32, launched))
}

/// A started command, as [`stream_execution`] streams it.
struct Launched {
    /// Output read before the launcher said the pid.
    early: Vec<OutputLine>,
    output: mpsc::Receiver<OutputLine>,
    process: Arc<Process>,
    output_cancelled: Arc<AtomicBool>,
}

/// Start event, output chunks, end event, end of stream.
async fn stream_execution(pid: u32, launched: Launched, tx: mpsc::Sender<Bytes>) {
    let Launched {
        early,
        mut output,
        process,
        output_cancelled,
    } = launched;
    let message = |event: Value| envelope(0, &json!({ "event": event }));
    // A client that went away does not stop the command: keep draining.
    let _ = tx.send(message(json!({ "start": { "pid": pid } }))).await;
    let mut early = early.into_iter();
    loop {
        let line = match early.next() {
            Some(line) => line,
            None => match output.recv().await {
                Some(line) => line,
                None => break,
            },
        };
        // envd stops forwarding output once the command was sent SIGTERM or
        // SIGKILL (`Handler.SendSignal` cancels the output context).
        if output_cancelled.load(Ordering::SeqCst) {
            continue;
        }
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
            .map(|c| (c.pid, c.output_cancelled.clone()))
    });
    match target {
        Lookup::Live(Some((pid, output_cancelled))) => {
            // envd signals the one process (`cmd.Process.Signal`), never its
            // group or children, and stops its output on TERM and KILL.
            output_cancelled.store(true, Ordering::SeqCst);
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, signal) };
            axum::Json(json!({})).into_response()
        }
        Lookup::Live(None) => {
            connect_error(StatusCode::NOT_FOUND, "not_found", "process not found")
        }
        Lookup::Expired | Lookup::Unknown => proxy_not_found(&id),
    }
}
