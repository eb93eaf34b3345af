//! The Daytona emulator: the sandbox REST API and the toolbox session API
//! (`Authorization: Bearer <key>` on both).
//!
//! The toolbox is served where the sandbox's `toolboxProxyUrl` points,
//! `{url}/proxy/toolbox/{id}/process/...`, as Daytona's toolbox proxy
//! serves it; the API's deprecated `/toolbox/{id}/toolbox/...` routes are
//! not served. A session command runs as `sh -c <command>` in the sandbox;
//! its stdout and stderr go, line by line, into one log that `logs` answers
//! as plain text as it is so far: over plain HTTP the daemon never follows
//! a log, `follow=true` or not (`apps/daemon/pkg/session/log.go`; it
//! follows over a WebSocket only, which the emulator does not serve).
//! Deleting a session kills its commands (SIGKILL).
//!
//! It answers as Daytona does at tag `v0.190.0` of `daytonaio/daytona`
//! (written from reading the source, not copied: AGPL-3.0), where that
//! source says:
//! - create refuses `cpu`, `gpu`, `memory` and `disk` (400 "Cannot specify
//!   Sandbox resources when using a snapshot", `sandbox.controller.ts`) and
//!   an unknown snapshot (400, `sandbox.service.ts`); it answers once the
//!   sandbox runs (a `hold_creates` fault makes that slow);
//! - `GET /sandbox` pages by `cursor` with `limit` 1..200 (default 100) and
//!   answers `{items, nextCursor}` (`list-sandboxes-*.dto.ts`);
//! - stop of a sandbox not started: 400 "Sandbox is not in a stoppable
//!   state"; start answers while the sandbox is still `starting`;
//! - the toolbox proxy answers a sandbox it cannot find (never was, or
//!   deleted) 400 "failed to get sandbox public status: ..."
//!   (`apps/proxy/pkg/proxy/get_sandbox_target.go`), and one not started
//!   502 with no body (the reverse proxy's `ErrorHandler` in
//!   `libs/common-go/pkg/proxy/proxy.go`: nothing listens in a stopped
//!   sandbox);
//! - a deleted sandbox is 404 on the API ("Sandbox with ID or name X not
//!   found"); nothing answers 410.
//!
//! Not in that source, the emulator's own choices: a sandbox past its
//! `autoStopInterval` (0: never) is auto-stopped and, as `autoDeleteInterval`
//! would have it, deleted at once (the two folded into one expiry: what a
//! reaper sees); `starting` lasts [`START_DELAY`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use corral_provider::{ExecSpec, Labels, OutputLine, Process, Provider, ProviderError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::Server;
use crate::faults::{self, Faults};
use crate::record::Recorder;
use crate::sandboxes::{Lookup, Sandbox, Sandboxes};

/// Daytona's auto-stop when a create names none, minutes.
const DEFAULT_AUTO_STOP_MINUTES: u32 = 15;
/// How long a started sandbox stays `starting`.
const START_DELAY: Duration = Duration::from_millis(300);
/// The snapshots every organization has.
const SNAPSHOTS: [&str; 3] = ["daytona-small", "daytona-medium", "daytona-large"];
/// The organization every emulated sandbox belongs to.
const ORGANIZATION: &str = "emulated-organization";
/// `limit` of a list page when none is given, and its most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 200;

/// An emulated Daytona, stopped when dropped.
pub struct DaytonaEmulator {
    server: Server,
    state: Arc<DaytonaState>,
}

impl DaytonaEmulator {
    /// Starts on a free port; sandboxes live under `home`.
    pub async fn start(home: &Path) -> std::io::Result<DaytonaEmulator> {
        let state = Arc::new(DaytonaState {
            sandboxes: Sandboxes::start(home)?,
            faults: Arc::new(Faults::default()),
            create_hold: std::sync::Mutex::new(Duration::ZERO),
            page_size: std::sync::atomic::AtomicUsize::new(usize::MAX),
            url: std::sync::OnceLock::new(),
        });
        let server = Server::start(router(state.clone())).await?;
        let _ = state.url.set(server.url());
        Ok(DaytonaEmulator { server, state })
    }

    /// The API's base URL, `http://127.0.0.1:PORT` (the toolbox is under it).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Records every request and answer from [`Recorder::start`] on.
    pub fn recorder(&self) -> &Recorder {
        &self.server.recorder
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// As if the sandbox's auto-stop passed: killed, then 410 Gone.
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

    /// Creates answer only this long after the sandbox was made.
    pub fn hold_creates(&self, hold: Duration) {
        *self
            .state
            .create_hold
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hold;
    }

    /// List pages hold at most `n` sandboxes, whatever `limit` asks.
    pub fn set_page_size(&self, n: usize) {
        self.state
            .page_size
            .store(n.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the sandbox was created with resources (`cpu`, `memory`,
    /// `disk`) or an auto-delete interval, as the last create asked.
    pub fn auto_delete_minutes(&self, sandbox_id: &str) -> Option<i32> {
        match self
            .state
            .sandboxes
            .with(sandbox_id, |s| s.api.auto_delete_minutes)
        {
            Lookup::Live(minutes) => minutes,
            _ => None,
        }
    }
}

struct DaytonaState {
    sandboxes: Arc<Sandboxes<DaytonaSandbox>>,
    faults: Arc<Faults>,
    /// How long a create is held before it answers (as Daytona holds one
    /// until the sandbox runs).
    create_hold: std::sync::Mutex<Duration>,
    /// A smaller page than asked for, to exercise paging.
    page_size: std::sync::atomic::AtomicUsize,
    /// The emulator's base URL, known once it listens.
    url: std::sync::OnceLock<String>,
}

impl DaytonaState {
    /// What every sandbox names as its `toolboxProxyUrl`.
    fn toolbox_proxy_url(&self) -> String {
        let base = self.url.get().map(String::as_str).unwrap_or_default();
        format!("{base}/proxy/toolbox")
    }
}

struct DaytonaSandbox {
    snapshot: String,
    auto_stop_minutes: u32,
    auto_delete_minutes: Option<i32>,
    /// `starting` until then (after a start).
    starting_until: Option<std::time::Instant>,
    env: BTreeMap<String, String>,
    /// Commands by id, by session id.
    sessions: HashMap<String, HashMap<String, Arc<Command>>>,
}

impl DaytonaSandbox {
    fn lifetime(&self) -> Option<Duration> {
        match self.auto_stop_minutes {
            0 => None,
            minutes => Some(Duration::from_secs(u64::from(minutes) * 60)),
        }
    }
}

struct Command {
    command: String,
    process: Arc<Process>,
    log: watch::Sender<Log>,
}

/// A command's combined output so far, and its exit code once it ended.
#[derive(Default)]
struct Log {
    text: String,
    exit_code: Option<i32>,
}

type Shared = State<Arc<DaytonaState>>;

/// Everything under the key check and the faults.
fn router(state: Arc<DaytonaState>) -> Router {
    let session = "/proxy/toolbox/{id}/process/session";
    Router::new()
        .route("/sandbox", post(create).get(list))
        .route("/sandbox/{id}", get(detail).delete(kill))
        .route("/sandbox/{id}/stop", post(stop))
        .route("/sandbox/{id}/start", post(start))
        .route(session, post(create_session))
        .route(&format!("{session}/{{session}}"), delete(delete_session))
        .route(&format!("{session}/{{session}}/exec"), post(exec))
        .route(
            &format!("{session}/{{session}}/command/{{cmd}}"),
            get(command),
        )
        .route(
            &format!("{session}/{{session}}/command/{{cmd}}/logs"),
            get(logs),
        )
        .layer(middleware::from_fn(require_bearer))
        .layer(middleware::from_fn(error_bodies))
        .layer(middleware::from_fn_with_state(
            state.faults.clone(),
            faults::inject,
        ))
        .with_state(state)
}

async fn require_bearer(request: Request, next: Next) -> Response {
    let has_key = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty());
    if !has_key {
        return error(StatusCode::UNAUTHORIZED, "missing bearer token");
    }
    next.run(request).await
}

/// Error bodies as each side of Daytona writes them: the API (NestJS,
/// `apps/api/src/filters/all-exceptions.filter.ts`) `{path, timestamp,
/// statusCode, error, message}`; the toolbox and its proxy (Go,
/// `libs/common-go/pkg/errors/http.go`, `ErrorResponse`) `{statusCode,
/// message, code, timestamp, path, method}`. Handlers answer the NestJS
/// body without path and time; this completes it for the side asked.
async fn error_bodies(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().to_string();
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status().as_u16() < 400 || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    fields.insert("path".into(), json!(path));
    fields.insert("timestamp".into(), json!(chrono::Utc::now().to_rfc3339()));
    if path.starts_with("/proxy/toolbox/") {
        fields.remove("error");
        let code = parts
            .status
            .canonical_reason()
            .unwrap_or("ERROR")
            .to_ascii_uppercase()
            .replace(' ', "_");
        fields.entry("code").or_insert(json!(code));
        fields.insert("method".into(), json!(method));
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&fields).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// NestJS's error body (see [`error_bodies`]).
fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "statusCode": status.as_u16(),
        "message": message,
        "error": status.canonical_reason().unwrap_or(""),
    });
    (status, axum::Json(body)).into_response()
}

/// A sandbox that never was, or was deleted (expired ones included).
fn missing<T>(_lookup: Lookup<T>, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("Sandbox with ID or name {id} not found"),
    )
}

/// The toolbox proxy's answer for a sandbox it cannot reach: 400 for one
/// it cannot find, 502 for one not started.
fn unreachable<T>(lookup: Lookup<T>) -> Response {
    match lookup {
        Lookup::Live(_) => StatusCode::BAD_GATEWAY.into_response(),
        Lookup::Expired | Lookup::Unknown => {
            let body = json!({
                "statusCode": 400,
                "message": "failed to get sandbox public status: sandbox not found",
                "code": "BAD_REQUEST",
            });
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
    }
}

impl DaytonaSandbox {
    fn state(&self, paused: bool) -> &'static str {
        if paused {
            "stopped"
        } else if self
            .starting_until
            .is_some_and(|until| std::time::Instant::now() < until)
        {
            "starting"
        } else {
            "started"
        }
    }
}

fn failed(err: ProviderError) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string())
}

/// A sandbox as the list answers it (`SandboxListItem`).
fn listed(sandbox: &Sandbox<DaytonaSandbox>, proxy: &str) -> Value {
    json!({
        "id": sandbox.id,
        "organizationId": ORGANIZATION,
        "name": sandbox.id,
        "target": "us",
        "user": "daytona",
        "public": false,
        "toolboxProxyUrl": proxy,
        "state": sandbox.api.state(sandbox.paused),
        "labels": sandbox.labels,
        "snapshot": sandbox.api.snapshot,
        // The snapshot's size (daytona-small).
        "cpu": 1,
        "gpu": 0,
        "memory": 1,
        "disk": 3,
        "autoStopInterval": sandbox.api.auto_stop_minutes,
        "autoDeleteInterval": sandbox.api.auto_delete_minutes.unwrap_or(-1),
        "createdAt": sandbox.started_at.to_rfc3339(),
    })
}

/// A sandbox as create, get, stop, start and delete answer it (`Sandbox`).
fn described(sandbox: &Sandbox<DaytonaSandbox>, proxy: &str) -> Value {
    let mut body = listed(sandbox, proxy);
    body["env"] = json!(sandbox.api.env);
    body["networkBlockAll"] = json!(false);
    body
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    snapshot: Option<String>,
    cpu: Option<u32>,
    gpu: Option<u32>,
    memory: Option<u32>,
    disk: Option<u32>,
    #[serde(default)]
    labels: Labels,
    auto_stop_interval: Option<u32>,
    auto_delete_interval: Option<i32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

async fn create(State(state): Shared, axum::Json(body): axum::Json<NewSandbox>) -> Response {
    if let Some(refused) = state.faults.take_refused_create() {
        return refused;
    }
    let resources = [body.cpu, body.gpu, body.memory, body.disk];
    if resources.iter().any(|r| r.is_some_and(|n| n > 0)) {
        let message = "Cannot specify Sandbox resources when using a snapshot";
        return error(StatusCode::BAD_REQUEST, message);
    }
    let snapshot = body.snapshot.unwrap_or_else(|| SNAPSHOTS[0].into());
    if !SNAPSHOTS.contains(&snapshot.as_str()) {
        let message =
            format!("Snapshot {snapshot} not found. Did you add it through the Daytona Dashboard?");
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let api = DaytonaSandbox {
        snapshot,
        auto_stop_minutes: body.auto_stop_interval.unwrap_or(DEFAULT_AUTO_STOP_MINUTES),
        auto_delete_minutes: body.auto_delete_interval,
        starting_until: None,
        env: body.env,
        sessions: HashMap::new(),
    };
    let lifetime = api.lifetime();
    let sandboxes = &state.sandboxes;
    let id = match sandboxes.create(body.labels, lifetime, api).await {
        Ok(id) => id,
        Err(err) => return failed(err),
    };
    let hold = *state.create_hold.lock().unwrap_or_else(|p| p.into_inner());
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    if state.faults.take_lost_create() {
        return error(StatusCode::BAD_GATEWAY, "injected fault: response lost");
    }
    match sandboxes.with(&id, |s| described(s, &state.toolbox_proxy_url())) {
        Lookup::Live(body) => axum::Json(body).into_response(),
        lookup => missing(lookup, &id),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    /// A JSON object of labels every sandbox listed carries.
    labels: Option<String>,
    limit: Option<usize>,
    /// The id of the last sandbox of the previous page.
    cursor: Option<String>,
}

async fn list(State(state): Shared, Query(query): Query<ListQuery>) -> Response {
    let wanted: Labels = match query.labels.as_deref().map(serde_json::from_str) {
        None => Labels::new(),
        Some(Ok(labels)) => labels,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "Invalid labels JSON format"),
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        let message = format!("limit must not be greater than {MAX_PAGE}");
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let page = limit.min(state.page_size.load(std::sync::atomic::Ordering::SeqCst));
    let after = query.cursor.unwrap_or_default();
    let mut found = state.sandboxes.list(|s| {
        let labelled = wanted.iter().all(|(k, v)| s.labels.get(k) == Some(v));
        (labelled && s.id.as_str() > after.as_str())
            .then(|| (s.id.clone(), listed(s, &state.toolbox_proxy_url())))
    });
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let more = found.len() > page;
    found.truncate(page);
    let next_cursor = if more {
        found.last().map(|(id, _)| Value::from(id.clone()))
    } else {
        None
    };
    let items: Vec<Value> = found.into_iter().map(|(_, body)| body).collect();
    axum::Json(json!({ "items": items, "nextCursor": next_cursor })).into_response()
}

async fn detail(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    match state
        .sandboxes
        .with(&id, |s| described(s, &state.toolbox_proxy_url()))
    {
        Lookup::Live(body) => axum::Json(body).into_response(),
        lookup => missing(lookup, &id),
    }
}

async fn kill(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    // Daytona answers a delete with the sandbox as it was (`Sandbox`).
    let last = state
        .sandboxes
        .with(&id, |s| described(s, &state.toolbox_proxy_url()));
    match (state.sandboxes.kill(&id).await, last) {
        (Lookup::Live(()), Lookup::Live(mut body)) => {
            body["state"] = json!("destroying");
            axum::Json(body).into_response()
        }
        (Lookup::Live(()), _) => StatusCode::OK.into_response(),
        (lookup, _) => missing(lookup, &id),
    }
}

/// Only a started sandbox stops; its processes are frozen.
async fn stop(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let stoppable = match state.sandboxes.with(&id, |s| {
        let started = s.api.state(s.paused) == "started";
        if started {
            s.paused = true;
        }
        (started, described(s, &state.toolbox_proxy_url()))
    }) {
        Lookup::Live(stoppable) => stoppable,
        lookup => return missing(lookup, &id),
    };
    let (started, _) = stoppable;
    if !started {
        return error(
            StatusCode::BAD_REQUEST,
            "Sandbox is not in a stoppable state",
        );
    }
    if let Err(err) = state.sandboxes.local().pause(&id).await {
        return failed(err);
    }
    match state
        .sandboxes
        .with(&id, |s| described(s, &state.toolbox_proxy_url()))
    {
        Lookup::Live(body) => axum::Json(body).into_response(),
        lookup => missing(lookup, &id),
    }
}

/// Starting restarts the auto-stop clock and answers while the sandbox is
/// still `starting`; starting a started sandbox answers it as it is.
async fn start(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let was_stopped = match state.sandboxes.with(&id, |s| {
        let lifetime = s.api.lifetime();
        s.expire_in(lifetime);
        let was_stopped = std::mem::replace(&mut s.paused, false);
        if was_stopped {
            s.api.starting_until = Some(std::time::Instant::now() + START_DELAY);
        }
        was_stopped
    }) {
        Lookup::Live(was_stopped) => was_stopped,
        lookup => return missing(lookup, &id),
    };
    if was_stopped && let Err(err) = state.sandboxes.local().resume(&id).await {
        return failed(err);
    }
    match state
        .sandboxes
        .with(&id, |s| described(s, &state.toolbox_proxy_url()))
    {
        Lookup::Live(body) => axum::Json(body).into_response(),
        lookup => missing(lookup, &id),
    }
}

/// The sandbox, if the toolbox can reach it (started).
fn running<T>(
    state: &DaytonaState,
    id: &str,
    f: impl FnOnce(&mut Sandbox<DaytonaSandbox>) -> T,
) -> Result<T, Box<Response>> {
    match state
        .sandboxes
        .with(id, |s| (s.api.state(s.paused) == "started").then(|| f(s)))
    {
        Lookup::Live(Some(value)) => Ok(value),
        Lookup::Live(None) => Err(Box::new(unreachable(Lookup::Live(())))),
        lookup => Err(Box::new(unreachable(lookup))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSession {
    session_id: String,
}

async fn create_session(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    axum::Json(body): axum::Json<NewSession>,
) -> Response {
    let created = running(&state, &id, |s| {
        if s.api.sessions.contains_key(&body.session_id) {
            return false;
        }
        s.api.sessions.insert(body.session_id, HashMap::new());
        true
    });
    match created {
        Ok(true) => StatusCode::CREATED.into_response(),
        Ok(false) => error(StatusCode::CONFLICT, "session already exists"),
        Err(refused) => *refused,
    }
}

/// Kills the session's commands, then forgets them.
async fn delete_session(
    State(state): Shared,
    UrlPath((id, session)): UrlPath<(String, String)>,
) -> Response {
    let commands = match running(&state, &id, |s| s.api.sessions.remove(&session)) {
        Ok(Some(commands)) => commands,
        Ok(None) => return error(StatusCode::NOT_FOUND, "session not found"),
        Err(refused) => return *refused,
    };
    for command in commands.values() {
        command.process.kill().await;
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecRequest {
    command: String,
    #[serde(default)]
    run_async: bool,
}

async fn exec(
    State(state): Shared,
    UrlPath((id, session)): UrlPath<(String, String)>,
    axum::Json(body): axum::Json<ExecRequest>,
) -> Response {
    let env = match running(&state, &id, |s| {
        s.api
            .sessions
            .contains_key(&session)
            .then(|| s.api.env.clone())
    }) {
        Ok(Some(env)) => env,
        Ok(None) => return error(StatusCode::NOT_FOUND, "session not found"),
        Err(refused) => return *refused,
    };
    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), body.command.clone()],
        env,
    };
    let execution = match state.sandboxes.local().exec(&id, &spec).await {
        Ok(execution) => execution,
        Err(ProviderError::NotFound(_)) => return unreachable(Lookup::<()>::Expired),
        Err(err) => return failed(err),
    };
    let cmd_id = uuid::Uuid::now_v7().simple().to_string();
    let process = Arc::new(execution.process);
    let (log, _) = watch::channel(Log::default());
    let command = Arc::new(Command {
        command: body.command,
        process: process.clone(),
        log,
    });
    tokio::spawn(record(execution.output, command.clone()));
    let registered = state.sandboxes.with(&id, |s| {
        s.api
            .sessions
            .get_mut(&session)
            .map(|commands| commands.insert(cmd_id.clone(), command.clone()))
            .is_some()
    });
    if !matches!(registered, Lookup::Live(true)) {
        // The session or the sandbox went away meanwhile.
        process.kill().await;
        return error(StatusCode::NOT_FOUND, "session not found");
    }
    if body.run_async {
        return axum::Json(json!({ "cmdId": cmd_id })).into_response();
    }
    let mut log = command.log.subscribe();
    let _ = log.wait_for(|log| log.exit_code.is_some()).await;
    let log = log.borrow();
    axum::Json(json!({ "cmdId": cmd_id, "output": log.text, "exitCode": log.exit_code }))
        .into_response()
}

/// Appends the command's output to its log, then its exit code.
async fn record(mut output: mpsc::Receiver<OutputLine>, command: Arc<Command>) {
    while let Some(line) = output.recv().await {
        command.log.send_modify(|log| {
            log.text.push_str(&line.line);
            log.text.push('\n');
        });
    }
    let code = command.process.wait().await.code();
    command.log.send_modify(|log| log.exit_code = Some(code));
}

/// The command of a session of a live sandbox, if there is such a command.
fn find_command(
    state: &DaytonaState,
    id: &str,
    session: &str,
    cmd: &str,
) -> Result<Option<Arc<Command>>, Box<Response>> {
    running(state, id, |s| {
        s.api
            .sessions
            .get(session)
            .and_then(|commands| commands.get(cmd).cloned())
    })
}

async fn command(
    State(state): Shared,
    UrlPath((id, session, cmd)): UrlPath<(String, String, String)>,
) -> Response {
    let command = match find_command(&state, &id, &session, &cmd) {
        Ok(Some(command)) => command,
        Ok(None) => return error(StatusCode::NOT_FOUND, "command not found"),
        Err(refused) => return *refused,
    };
    let exit_code = command.log.borrow().exit_code;
    // `exitCode` is left out while the command runs (`omitempty`).
    let mut body = json!({ "id": cmd, "command": command.command });
    if let Some(code) = exit_code {
        body["exitCode"] = json!(code);
    }
    axum::Json(body).into_response()
}

#[derive(Deserialize)]
struct LogsQuery {
    /// Taken, and without a WebSocket ignored, as the daemon does.
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(state): Shared,
    UrlPath((id, session, cmd)): UrlPath<(String, String, String)>,
    Query(query): Query<LogsQuery>,
) -> Response {
    let command = match find_command(&state, &id, &session, &cmd) {
        Ok(Some(command)) => command,
        Ok(None) => return error(StatusCode::NOT_FOUND, "command not found"),
        Err(refused) => return *refused,
    };
    // Over plain HTTP the log as it is: `follow` is for WebSockets only.
    let _ = query.follow;
    let plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let text = command.log.borrow().text.clone();
    (plain, text).into_response()
}
