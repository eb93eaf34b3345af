//! The web console: the runs list, a run's page with its timeline and its
//! events live, the nodes, and the dead letters; served by event ingest
//! under `/console` behind the same API keys as event reads. A browser
//! signs in once with its key, which the console keeps in an HttpOnly,
//! SameSite=Strict cookie; the buttons need the scope `runs:control` and
//! send the same commands as the CLI.
//!
//! Pages are rendered on the server ([`pages`]); one small script (built
//! into the binary, like the stylesheet) refreshes the live parts and
//! renders a run's events from the event API, a page at a time, then tails
//! them live. Nothing is fetched from anywhere else.

// A refusal here is the answer itself, built once per request: boxing it
// would buy nothing.
#![allow(clippy::result_large_err)]

mod data;
mod pages;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use corral_client::ClientError;
use corral_proto::v1::{
    ContinueCommand, ListRunsRequest, RunState, SessionCommand, StopCommand, session_command,
    stop_reply::Outcome,
};
use serde::Deserialize;

use crate::auth::{CONSOLE_COOKIE, Granted, Scope};
use crate::http::AppState;

/// Runs on one page of the list.
const PAGE: usize = 50;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(runs))
        .route("/console/rows", get(rows))
        .route("/console/stop", post(stop_selected))
        .route("/console/runs/{run_id}", get(run_page))
        .route("/console/runs/{run_id}/status", get(run_status))
        .route("/console/runs/{run_id}/{action}", post(act))
        .route("/console/nodes", get(nodes))
        .route("/console/dead-letters", get(dead_letters))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/assets/console.js", get(script))
        .route("/console/assets/console.css", get(stylesheet))
        .layer(axum::middleware::map_response(locked_down))
}

/// Console pages load only their own script and stylesheet, and no other
/// site may frame them (a stop button under someone else's page).
async fn locked_down(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Who is asking, when they may do `scope`; otherwise the answer a
/// browser should get: the sign-in page for no key, a page saying why for
/// a key without the scope.
fn allowed(
    state: &AppState,
    headers: &HeaderMap,
    scope: Scope,
    uri: &Uri,
) -> Result<Granted, Response> {
    state.auth.check(headers, scope).map_err(|refused| {
        if refused.status() == StatusCode::UNAUTHORIZED && scope != Scope::Control {
            let next = uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/console");
            let target = format!("/console/login?next={}", encode(next));
            return Redirect::to(&target).into_response();
        }
        page_error(refused.status(), refused.message())
    })
}

/// A fragment's refusal: the status alone, for the script to show.
fn fragment_allowed(state: &AppState, headers: &HeaderMap) -> Result<Granted, Response> {
    state
        .auth
        .check(headers, Scope::Read)
        .map_err(|refused| (refused.status(), refused.message().to_owned()).into_response())
}

fn page_error(status: StatusCode, message: &str) -> Response {
    (status, Html(pages::error(status, message).into_string())).into_response()
}

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A form body as pairs, repeated names kept.
fn form(body: &Bytes) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// A form post from another site is refused: the cookie is SameSite=Strict,
/// and the browser's own word on where the request came from must agree.
fn same_origin(headers: &HeaderMap) -> Result<(), Response> {
    let site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("same-origin");
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .filter(|origin| *origin != "null")
        .map(|origin| origin.split_once("://").map_or(origin, |(_, rest)| rest));
    let cross_origin = match (origin_host, host) {
        (Some(origin), Some(host)) => origin != host,
        _ => false,
    };
    if !matches!(site, "same-origin" | "none") || cross_origin {
        return Err(page_error(
            StatusCode::FORBIDDEN,
            "refused: the form was posted from another site",
        ));
    }
    Ok(())
}

/// Back to `to` with a notice shown on top.
fn back(to: &str, notice: &str) -> Response {
    let joiner = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{joiner}notice={}", encode(notice))).into_response()
}

/// Where the console may send a browser after a form: its own pages only.
fn local_target(next: Option<&str>) -> &str {
    match next {
        Some(next) if next.starts_with("/console") && !next.starts_with("//") => next,
        _ => "/console",
    }
}

#[derive(Deserialize, Default, Clone)]
pub(crate) struct ListQuery {
    /// Comma-separated state names.
    #[serde(default)]
    pub state: String,
    /// Comma-separated `key=value` labels, all of which must match.
    #[serde(default)]
    pub label: String,
    /// Only runs created within this much time: `15m`, `1h`, `24h`, `7d`.
    #[serde(default)]
    pub since: String,
    /// Page cursor: runs created before this one.
    #[serde(default)]
    pub before: String,
    #[serde(default)]
    pub notice: String,
}

/// The runs a query selects, newest first, and the cursor of the next page.
pub(crate) struct Listed {
    pub runs: Vec<corral_proto::v1::Run>,
    pub next: Option<String>,
    pub now_ms: i64,
}

async fn list(state: &AppState, query: &ListQuery) -> Result<Listed, String> {
    let mut states = Vec::new();
    for name in query
        .state
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let state = RunState::from_name(name).ok_or_else(|| {
            format!(
                "state: unknown state {name:?} (known: {})",
                RunState::ALL.map(RunState::name).join(", ")
            )
        })?;
        states.push(state as i32);
    }
    let mut labels = std::collections::HashMap::new();
    for pair in query
        .label
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("label: {pair:?} is not key=value"))?;
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    let since_ms = parse_since(&query.since)?;
    let now_ms = corral_common::now_ms();
    let request = ListRunsRequest {
        states,
        labels,
        limit: PAGE as u32 + 1,
        before_run_id: query.before.clone(),
    };
    let mut runs = state
        .client
        .list(&request)
        .await
        .map_err(|err| format!("the tracker did not answer: {err}"))?;
    let mut next = None;
    if runs.len() > PAGE {
        runs.truncate(PAGE);
        next = runs.last().map(|run| run.run_id.clone());
    }
    if let Some(since_ms) = since_ms {
        let cutoff = now_ms - since_ms;
        let before = runs.len();
        runs.retain(|run| run.created_at_ms >= cutoff);
        // Newest first: once one is older, so is every later page.
        if runs.len() < before {
            next = None;
        }
    }
    Ok(Listed { runs, next, now_ms })
}

fn parse_since(since: &str) -> Result<Option<i64>, String> {
    let since = since.trim();
    if since.is_empty() {
        return Ok(None);
    }
    let (number, unit) = since.split_at(since.len() - 1);
    let unit_ms = match unit {
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("since: {since:?} is not like 15m, 1h or 7d")),
    };
    let number: i64 = number
        .parse()
        .map_err(|_| format!("since: {since:?} is not like 15m, 1h or 7d"))?;
    Ok(Some(number.saturating_mul(unit_ms)))
}

async fn runs(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let granted = match allowed(&state, &headers, Scope::Read, &uri) {
        Ok(granted) => granted,
        Err(refused) => return refused,
    };
    let listed = list(&state, &query).await;
    let rows_url = format!(
        "/console/rows?{}",
        uri.query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.starts_with("notice="))
            .collect::<Vec<_>>()
            .join("&")
    );
    let control = state.auth.check(&headers, Scope::Control).is_ok();
    Html(pages::runs(&granted.key_id, &query, listed.as_ref(), &rows_url, control).into_string())
        .into_response()
}

/// The list's rows alone, for the page's live refresh.
async fn rows(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = fragment_allowed(&state, &headers) {
        return refused;
    }
    match list(&state, &query).await {
        Ok(listed) => Html(pages::rows(&listed).into_string()).into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
    }
}

/// Stops every run ticked in the list.
async fn stop_selected(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let granted = match allowed(&state, &headers, Scope::Control, &uri) {
        Ok(granted) => granted,
        Err(refused) => return refused,
    };
    if let Err(refused) = same_origin(&headers) {
        return refused;
    }
    let form = form(&body);
    let back_to = local_target(field(&form, "back")).to_owned();
    let ids: Vec<&str> = form
        .iter()
        .filter(|(key, _)| key == "run_id")
        .map(|(_, value)| value.as_str())
        .collect();
    if ids.is_empty() {
        return back(&back_to, "no run selected: tick the runs to stop");
    }
    let mut accepted = 0;
    let mut problems = Vec::new();
    for id in &ids {
        match stop(&state, &granted, id, "stopped from the console").await {
            Ok(Outcome::Accepted) => accepted += 1,
            Ok(_) => {}
            Err(err) => problems.push(format!("{id}: {err}")),
        }
    }
    let mut notice = format!("stop requested for {accepted} of {} runs", ids.len());
    if !problems.is_empty() {
        notice.push_str(&format!("; {}", problems.join("; ")));
    }
    back(&back_to, &notice)
}

async fn stop(
    state: &AppState,
    granted: &Granted,
    run_id: &str,
    reason: &str,
) -> Result<Outcome, String> {
    corral_proto::validate_run_id(run_id).map_err(|err| err.to_string())?;
    let command = StopCommand {
        run_id: run_id.to_owned(),
        reason: reason.to_owned(),
        requested_by: format!("console:{}", granted.key_id),
        requested_at_ms: corral_common::now_ms(),
    };
    match state.client.stop(&command).await {
        Ok((Outcome::NotFound, _)) => Err("no such run".into()),
        Ok((outcome, _)) => Ok(outcome),
        Err(err) => Err(format!("the stop was not recorded: {err}")),
    }
}

async fn run_page(
    State(state): State<Arc<AppState>>,
    Path(run_id): Path<String>,
    Query(query): Query<pages::RunQuery>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let granted = match allowed(&state, &headers, Scope::Read, &uri) {
        Ok(granted) => granted,
        Err(refused) => return refused,
    };
    let status = match status_of(&state, &run_id).await {
        Ok(status) => status,
        Err(refused) => return refused,
    };
    let control = state.auth.check(&headers, Scope::Control).is_ok();
    Html(pages::run(&granted.key_id, &status, &query, control).into_string()).into_response()
}

/// A run's status, timeline and buttons, for the page's live refresh.
async fn run_status(
    State(state): State<Arc<AppState>>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = fragment_allowed(&state, &headers) {
        return refused;
    }
    let control = state.auth.check(&headers, Scope::Control).is_ok();
    match status_of(&state, &run_id).await {
        Ok(status) => Html(pages::status(&status, control).into_string()).into_response(),
        Err(refused) => refused,
    }
}

/// What a run's page shows above its events.
pub(crate) struct RunStatus {
    pub run: corral_proto::v1::Run,
    pub timeline: Result<Vec<crate::store::Transition>, String>,
    pub now_ms: i64,
}

async fn status_of(state: &AppState, run_id: &str) -> Result<RunStatus, Response> {
    if let Err(err) = corral_proto::validate_run_id(run_id) {
        return Err(page_error(StatusCode::BAD_REQUEST, &err.to_string()));
    }
    let run = match state.client.get(run_id).await {
        Ok(run) => run,
        Err(err) if is_not_found(&err) => {
            return Err(page_error(
                StatusCode::NOT_FOUND,
                &format!("no run {run_id}"),
            ));
        }
        Err(err) => {
            return Err(page_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the tracker did not answer: {err}"),
            ));
        }
    };
    // A page shows the first 500 transitions at most.
    let timeline = crate::store::transitions(&state.pool, run_id)
        .await
        .map(|mut steps| {
            steps.truncate(500);
            steps
        })
        .map_err(|err| format!("timeline unavailable: {err}"));
    Ok(RunStatus {
        run,
        timeline,
        now_ms: corral_common::now_ms(),
    })
}

fn is_not_found(err: &ClientError) -> bool {
    err.code() == Some(corral_proto::v1::tracker_error::Code::NotFound)
}

/// A run page's buttons: stop, pause, resume, continue.
async fn act(
    State(state): State<Arc<AppState>>,
    Path((run_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let granted = match allowed(&state, &headers, Scope::Control, &uri) {
        Ok(granted) => granted,
        Err(refused) => return refused,
    };
    if let Err(refused) = same_origin(&headers) {
        return refused;
    }
    if let Err(err) = corral_proto::validate_run_id(&run_id) {
        return page_error(StatusCode::BAD_REQUEST, &err.to_string());
    }
    let form = form(&body);
    let page = format!("/console/runs/{run_id}");
    let who = format!("console:{}", granted.key_id);
    let notice = match action.as_str() {
        "stop" => {
            let reason = field(&form, "reason")
                .filter(|r| !r.trim().is_empty())
                .unwrap_or("stopped from the console");
            match stop(&state, &granted, &run_id, reason).await {
                Ok(Outcome::Accepted) => "stop requested".to_owned(),
                Ok(Outcome::AlreadyRequested) => "a stop was already requested".to_owned(),
                Ok(Outcome::AlreadyTerminal) => "the run had already ended".to_owned(),
                Ok(Outcome::FinalizeInProgress) => {
                    "finalize already in progress: the run will finish it".to_owned()
                }
                Ok(_) => "the tracker gave no answer".to_owned(),
                Err(err) => err,
            }
        }
        "pause" | "resume" => {
            let (from, verb, action) = if action == "pause" {
                (RunState::Idle, "pause", session_command::Action::Pause)
            } else {
                (RunState::Paused, "resume", session_command::Action::Resume)
            };
            match between_turns(&state, &run_id, &[from], verb).await {
                Err(notice) => notice,
                Ok(()) => {
                    let command = SessionCommand {
                        run_id: run_id.clone(),
                        action: action as i32,
                        requested_by: who,
                        requested_at_ms: corral_common::now_ms(),
                    };
                    match state.client.session(&command).await {
                        Ok(()) => format!("{verb} requested"),
                        Err(err) => format!("{verb} not sent: {err}"),
                    }
                }
            }
        }
        "continue" => {
            match between_turns(
                &state,
                &run_id,
                &[RunState::Idle, RunState::Paused],
                "continue",
            )
            .await
            {
                Err(notice) => notice,
                Ok(()) => {
                    let argv = field(&form, "command")
                        .map(|c| c.split_whitespace().map(str::to_owned).collect())
                        .unwrap_or_default();
                    let command = ContinueCommand {
                        run_id: run_id.clone(),
                        argv,
                        requested_by: who,
                        submitted_at_ms: corral_common::now_ms(),
                    };
                    match state.client.continue_run(&command).await {
                        Ok(()) => "next turn requested".to_owned(),
                        Err(err) => format!("continue not sent: {err}"),
                    }
                }
            }
        }
        other => {
            return page_error(
                StatusCode::NOT_FOUND,
                &format!("no action {other:?}: stop, pause, resume or continue"),
            );
        }
    };
    back(&page, &notice)
}

/// Ok when the run is in one of `states`; otherwise the notice saying why not.
async fn between_turns(
    state: &AppState,
    run_id: &str,
    states: &[RunState],
    verb: &str,
) -> Result<(), String> {
    let run = state
        .client
        .get(run_id)
        .await
        .map_err(|err| format!("{verb}: the tracker did not answer: {err}"))?;
    if states.contains(&run.state()) {
        return Ok(());
    }
    let wanted: Vec<&str> = states.iter().map(|s| s.name()).collect();
    Err(format!(
        "cannot {verb}: the run is {}, and {verb} needs it {}",
        run.state().name(),
        wanted.join(" or ")
    ))
}

async fn nodes(State(state): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    let granted = match allowed(&state, &headers, Scope::Read, &uri) {
        Ok(granted) => granted,
        Err(refused) => return refused,
    };
    let nodes = data::nodes(&state.client).await;
    Html(pages::nodes(&granted.key_id, nodes.as_ref(), corral_common::now_ms()).into_string())
        .into_response()
}

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let granted = match allowed(&state, &headers, Scope::Read, &uri) {
        Ok(granted) => granted,
        Err(refused) => return refused,
    };
    let letters = data::dead_letters(&state.js, &state.subjects, 100).await;
    Html(pages::dead_letters(&granted.key_id, letters.as_ref()).into_string()).into_response()
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    notice: String,
}

async fn login_form(Query(query): Query<LoginQuery>) -> Response {
    Html(pages::login(local_target(Some(&query.next)), &query.notice).into_string()).into_response()
}

/// Checks the key, then keeps it in the cookie.
async fn login(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = same_origin(&headers) {
        return refused;
    }
    let form = form(&body);
    let next = local_target(field(&form, "next")).to_owned();
    let key = field(&form, "key").unwrap_or_default().trim().to_owned();
    let again = |why: &str| {
        Redirect::to(&format!(
            "/console/login?next={}&notice={}",
            encode(&next),
            encode(why)
        ))
        .into_response()
    };
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return again("paste an API key (`corral keys new` makes one)");
    }
    let mut presented = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {key}")) {
        presented.insert(header::AUTHORIZATION, value);
    }
    if let Err(refused) = state.auth.check(&presented, Scope::Read) {
        return again(refused.message());
    }
    let mut response = Redirect::to(&next).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{CONSOLE_COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict"
    )) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn logout(headers: HeaderMap) -> Response {
    if let Err(refused) = same_origin(&headers) {
        return refused;
    }
    let mut response = back("/console/login", "signed out");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("corral_key=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_minutes_hours_and_days_and_says_what_it_wants() {
        assert_eq!(parse_since(""), Ok(None));
        assert_eq!(parse_since("15m"), Ok(Some(15 * 60_000)));
        assert_eq!(parse_since("24h"), Ok(Some(24 * 3_600_000)));
        assert_eq!(parse_since("7d"), Ok(Some(7 * 86_400_000)));
        let err = parse_since("soon").expect_err("not a duration");
        assert!(err.starts_with("since:"), "{err}");
    }

    #[test]
    fn forms_send_browsers_only_to_console_pages() {
        assert_eq!(local_target(Some("/console/runs/r1")), "/console/runs/r1");
        assert_eq!(local_target(Some("https://evil.example/")), "/console");
        assert_eq!(local_target(Some("//evil.example/console")), "/console");
        assert_eq!(local_target(None), "/console");
    }

    #[test]
    fn posts_from_another_site_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8470"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8470"),
        );
        assert!(same_origin(&headers).is_ok());
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(same_origin(&headers).is_err());
        headers.remove(header::ORIGIN);
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&headers).is_err());
    }
}
