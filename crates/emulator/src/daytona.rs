//! The Daytona emulator: the sandbox REST API and the toolbox session API
//! (`Authorization: Bearer <key>` on both).
//!
//! A session command runs as `sh -c <command>` in the sandbox; its stdout
//! and stderr go, line by line, into one log that `logs?follow=true`
//! streams as plain text until the command has ended and its exit code is
//! known. Deleting a session kills its commands (SIGKILL). A sandbox
//! expires `autoStopInterval` minutes after its create or start (0: never)
//! and answers 410 Gone from then on; a stopped one does not expire. (Real
//! Daytona stops an idle sandbox and deletes it later; the emulator folds
//! both into one expiry, which is what a reaper sees.)

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
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
use crate::sandboxes::{Lookup, Sandbox, Sandboxes};

/// Daytona's auto-stop when a create names none, minutes.
const DEFAULT_AUTO_STOP_MINUTES: u32 = 15;

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
        });
        let server = Server::start(router(state.clone())).await?;
        Ok(DaytonaEmulator { server, state })
    }

    /// The API's base URL, `http://127.0.0.1:PORT` (the toolbox is under it).
    pub fn url(&self) -> String {
        self.server.url()
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
}

struct DaytonaState {
    sandboxes: Arc<Sandboxes<DaytonaSandbox>>,
    faults: Arc<Faults>,
}

struct DaytonaSandbox {
    snapshot: String,
    cpu: u32,
    memory: u32,
    disk: u32,
    auto_stop_minutes: u32,
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
    let session = "/toolbox/{id}/toolbox/process/session";
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

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "statusCode": status.as_u16(), "message": message });
    (status, axum::Json(body)).into_response()
}

/// 404 for what never was (or was deleted), 410 for what expired.
fn missing<T>(lookup: Lookup<T>, id: &str) -> Response {
    match lookup {
        Lookup::Expired => error(StatusCode::GONE, &format!("sandbox {id} has expired")),
        _ => error(StatusCode::NOT_FOUND, &format!("sandbox {id} not found")),
    }
}

fn failed(err: ProviderError) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string())
}

fn described(sandbox: &Sandbox<DaytonaSandbox>) -> Value {
    json!({
        "id": sandbox.id,
        "state": if sandbox.paused { "stopped" } else { "started" },
        "labels": sandbox.labels,
        "snapshot": sandbox.api.snapshot,
        "cpu": sandbox.api.cpu,
        "memory": sandbox.api.memory,
        "disk": sandbox.api.disk,
        "autoStopInterval": sandbox.api.auto_stop_minutes,
        "env": sandbox.api.env,
        "createdAt": sandbox.started_at.to_rfc3339(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    snapshot: Option<String>,
    cpu: Option<u32>,
    memory: Option<u32>,
    disk: Option<u32>,
    #[serde(default)]
    labels: Labels,
    auto_stop_interval: Option<u32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

async fn create(State(state): Shared, axum::Json(body): axum::Json<NewSandbox>) -> Response {
    let api = DaytonaSandbox {
        snapshot: body.snapshot.unwrap_or_else(|| "daytonaio/sandbox".into()),
        cpu: body.cpu.unwrap_or(1),
        memory: body.memory.unwrap_or(1),
        disk: body.disk.unwrap_or(3),
        auto_stop_minutes: body.auto_stop_interval.unwrap_or(DEFAULT_AUTO_STOP_MINUTES),
        env: body.env,
        sessions: HashMap::new(),
    };
    let lifetime = api.lifetime();
    let sandboxes = &state.sandboxes;
    let id = match sandboxes.create(body.labels, lifetime, api).await {
        Ok(id) => id,
        Err(err) => return failed(err),
    };
    if state.faults.take_lost_create() {
        return error(StatusCode::BAD_GATEWAY, "injected fault: response lost");
    }
    match sandboxes.with(&id, |s| described(s)) {
        Lookup::Live(body) => axum::Json(body).into_response(),
        lookup => missing(lookup, &id),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    /// A JSON object of labels every sandbox listed carries.
    labels: Option<String>,
}

async fn list(State(state): Shared, Query(query): Query<ListQuery>) -> Response {
    let wanted: Labels = match query.labels.as_deref().map(serde_json::from_str) {
        None => Labels::new(),
        Some(Ok(labels)) => labels,
        Some(Err(err)) => {
            let message = format!("labels must be a JSON object of strings: {err}");
            return error(StatusCode::BAD_REQUEST, &message);
        }
    };
    let found = state.sandboxes.list(|s| {
        let labelled = wanted.iter().all(|(k, v)| s.labels.get(k) == Some(v));
        labelled.then(|| described(s))
    });
    axum::Json(found).into_response()
}

async fn detail(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    match state.sandboxes.with(&id, |s| described(s)) {
        Lookup::Live(body) => axum::Json(body).into_response(),
        lookup => missing(lookup, &id),
    }
}

async fn kill(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    match state.sandboxes.kill(&id).await {
        Lookup::Live(()) => StatusCode::OK.into_response(),
        lookup => missing(lookup, &id),
    }
}

/// Stopping a stopped sandbox is fine.
async fn stop(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let was_stopped = match state
        .sandboxes
        .with(&id, |s| std::mem::replace(&mut s.paused, true))
    {
        Lookup::Live(was_stopped) => was_stopped,
        lookup => return missing(lookup, &id),
    };
    if was_stopped {
        return StatusCode::OK.into_response();
    }
    match state.sandboxes.local().pause(&id).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => failed(err),
    }
}

/// Starting restarts the auto-stop clock; starting a started sandbox is fine.
async fn start(State(state): Shared, UrlPath(id): UrlPath<String>) -> Response {
    let was_stopped = match state.sandboxes.with(&id, |s| {
        let lifetime = s.api.lifetime();
        s.expire_in(lifetime);
        std::mem::replace(&mut s.paused, false)
    }) {
        Lookup::Live(was_stopped) => was_stopped,
        lookup => return missing(lookup, &id),
    };
    if !was_stopped {
        return StatusCode::OK.into_response();
    }
    match state.sandboxes.local().resume(&id).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => failed(err),
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
    let created = state.sandboxes.with(&id, |s| {
        if s.api.sessions.contains_key(&body.session_id) {
            return false;
        }
        s.api.sessions.insert(body.session_id, HashMap::new());
        true
    });
    match created {
        Lookup::Live(true) => StatusCode::CREATED.into_response(),
        Lookup::Live(false) => error(StatusCode::CONFLICT, "session already exists"),
        lookup => missing(lookup, &id),
    }
}

/// Kills the session's commands, then forgets them.
async fn delete_session(
    State(state): Shared,
    UrlPath((id, session)): UrlPath<(String, String)>,
) -> Response {
    let commands = match state
        .sandboxes
        .with(&id, |s| s.api.sessions.remove(&session))
    {
        Lookup::Live(Some(commands)) => commands,
        Lookup::Live(None) => return error(StatusCode::NOT_FOUND, "session not found"),
        lookup => return missing(lookup, &id),
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
    let env = match state.sandboxes.with(&id, |s| {
        s.api
            .sessions
            .contains_key(&session)
            .then(|| s.api.env.clone())
    }) {
        Lookup::Live(Some(env)) => env,
        Lookup::Live(None) => return error(StatusCode::NOT_FOUND, "session not found"),
        lookup => return missing(lookup, &id),
    };
    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), body.command.clone()],
        env,
    };
    let execution = match state.sandboxes.local().exec(&id, &spec).await {
        Ok(execution) => execution,
        Err(ProviderError::NotFound(_)) => return missing(Lookup::<()>::Unknown, &id),
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
) -> Lookup<Option<Arc<Command>>> {
    state.sandboxes.with(id, |s| {
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
        Lookup::Live(Some(command)) => command,
        Lookup::Live(None) => return error(StatusCode::NOT_FOUND, "command not found"),
        lookup => return missing(lookup, &id),
    };
    let exit_code = command.log.borrow().exit_code;
    let body = json!({ "id": cmd, "command": command.command, "exitCode": exit_code });
    axum::Json(body).into_response()
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(state): Shared,
    UrlPath((id, session, cmd)): UrlPath<(String, String, String)>,
    Query(query): Query<LogsQuery>,
) -> Response {
    let command = match find_command(&state, &id, &session, &cmd) {
        Lookup::Live(Some(command)) => command,
        Lookup::Live(None) => return error(StatusCode::NOT_FOUND, "command not found"),
        lookup => return missing(lookup, &id),
    };
    let plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !query.follow {
        let text = command.log.borrow().text.clone();
        return (plain, text).into_response();
    }
    let body = futures::stream::unfold(
        (command.log.subscribe(), 0usize),
        |(mut log, sent)| async move {
            loop {
                let (chunk, ended) = {
                    let current = log.borrow_and_update();
                    (current.text[sent..].to_owned(), current.exit_code.is_some())
                };
                if !chunk.is_empty() {
                    let sent = sent + chunk.len();
                    return Some((Ok::<_, Infallible>(Bytes::from(chunk)), (log, sent)));
                }
                if ended || log.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    (plain, Body::from_stream(body)).into_response()
}
