//! The HTTP API: agents post their run's events with the run token;
//! holders of an API key with the scope ([`crate::auth`]) read them, paged
//! up to the settled watermark (so pages have no gap however many instances
//! commit in whatever order), or as a live Server-Sent Events tail that
//! continues a cursor with no gap and no duplicate.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use axum::Json;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use corral_proto::Subjects;
use corral_proto::v1::AgentEvent;
use futures::{Stream, StreamExt};
use prost::Message;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::auth::Scope;
use crate::{store, wire};

pub struct AppState {
    pub js: jetstream::Context,
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub pool: PgPool,
    /// The run-token keys a token may be signed with.
    pub keyring: corral_common::token::Keyring,
    /// Who may read events.
    pub auth: crate::auth::Auth,
    pub max_diff: usize,
    /// Ends live tails, so a graceful shutdown does not wait on them.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Asks the tracker whether a run is still live.
    pub client: corral_client::Client,
    /// Recent answers: run id -> (live, when asked).
    pub liveness: std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>,
    /// The settled watermark, shared with GenAI traces.
    pub watermark: Arc<crate::persister::Watermark>,
}

impl AppState {
    /// Whether `run_id` has not ended, as the tracker said within the last
    /// two seconds. A tracker that cannot answer (or does not know the run
    /// yet) never makes an event get lost: the run counts as live.
    async fn run_is_live(&self, run_id: &str) -> bool {
        let fresh = Duration::from_secs(2);
        if let Ok(cache) = self.liveness.lock()
            && let Some((live, asked)) = cache.get(run_id)
            && (!live || asked.elapsed() < fresh)
        {
            return *live;
        }
        let live = match self.client.get(run_id).await {
            Ok(run) => !run.state().is_terminal(),
            Err(_) => return true,
        };
        if let Ok(mut cache) = self.liveness.lock() {
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.insert(run_id.to_owned(), (live, std::time::Instant::now()));
        }
        live
    }
}

pub fn router(state: Arc<AppState>, max_body: usize) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/runs/{run_id}/events",
            post(post_events).get(list_events),
        )
        .route("/v1/runs/{run_id}/events/stream", get(stream_events))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(crate::console::router())
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A run id as it goes into a subject: `*`, `>` or `.` would read (or
/// write) other runs' events, so anything but a plain id is a 400.
fn refused_run_id(run_id: &str) -> Option<Response> {
    corral_proto::validate_run_id(run_id)
        .err()
        .map(|err| error(StatusCode::BAD_REQUEST, err.to_string()))
}

/// 202 once JetStream acknowledged every event; 401 without a valid token,
/// 403 for another run's token, 422 naming the bad field, 413 over the size
/// limit (axum's body limit).
async fn post_events(
    State(state): State<Arc<AppState>>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refused_run_id(&run_id) {
        return refused;
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (use CORRAL_TOKEN)",
        );
    };
    let token_run = match state.keyring.verify(token, corral_common::now_ms()) {
        Ok(run) => run,
        Err(err) => return error(StatusCode::UNAUTHORIZED, err.to_string()),
    };
    if token_run != run_id {
        return error(
            StatusCode::FORBIDDEN,
            format!("the token is for run {token_run}, not {run_id}"),
        );
    }
    // A run's token expires when the run ends.
    if !state.run_is_live(&run_id).await {
        return error(
            StatusCode::UNAUTHORIZED,
            format!("run {run_id} has ended: its token is no longer valid"),
        );
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(err) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("body: not JSON: {err}"),
            );
        }
    };
    let (items, batch) = match parsed {
        Value::Array(items) => (items, true),
        item => (vec![item], false),
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = if batch {
            format!("[{i}].")
        } else {
            String::new()
        };
        let incoming: wire::Incoming = match serde_json::from_value(item) {
            Ok(incoming) => incoming,
            Err(err) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{at}{err}")),
        };
        match wire::to_proto(&run_id, incoming) {
            Ok(event) => events.push(event),
            Err(err) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{at}{err}")),
        }
    }
    let mut acks = Vec::with_capacity(events.len());
    for event in &events {
        let mut headers = corral_common::nats::traced_headers();
        // Event ids are unique per run: de-duplicated per run, too.
        let msg_id = format!("{run_id}:{}", event.event_id);
        headers.insert(corral_proto::headers::MSG_ID, msg_id.as_str());
        let subject = state.subjects.events(&run_id, &event.kind);
        match state
            .js
            .publish_with_headers(subject, headers, event.encode_to_vec().into())
            .await
        {
            Ok(ack) => acks.push(ack),
            Err(err) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("events not accepted: {err}"),
                );
            }
        }
    }
    for ack in acks {
        if let Err(err) = ack.await {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("events not accepted: {err}"),
            );
        }
    }
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "accepted": ids.len(), "event_ids": ids })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct PageQuery {
    #[serde(default)]
    after: i64,
    kind: Option<String>,
    limit: Option<i64>,
}

/// `?after=<cursor>&kind=<k>&limit=<n>`: stored events, oldest first, and
/// the cursor to continue from.
async fn list_events(
    State(state): State<Arc<AppState>>,
    Path(run_id): Path<String>,
    Query(query): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = state.auth.check(&headers, Scope::Read) {
        return refused.into_response();
    }
    if let Some(refused) = refused_run_id(&run_id) {
        return refused;
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let watermark = match watermark(&state).await {
        Ok(watermark) => watermark,
        Err(err) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("events unavailable: {err}"),
            );
        }
    };
    match store::page(
        &state.pool,
        &run_id,
        query.after,
        watermark,
        query.kind.as_deref(),
        limit,
    )
    .await
    {
        Ok(events) => {
            let next = events
                .last()
                .and_then(|e| e["cursor"].as_i64())
                .unwrap_or(query.after);
            Json(json!({ "events": events, "next_after": next })).into_response()
        }
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("events unavailable: {err}"),
        ),
    }
}

/// The highest stream sequence below which every event is settled (stored,
/// or dead-lettered): the persisting consumer's ack floor. Instances commit
/// batches in any order, and an event with a lower cursor may still be in
/// flight after a higher one is stored; a page never goes past the floor,
/// so a reader that continues from a page's last cursor skips nothing.
async fn watermark(state: &AppState) -> Result<i64, String> {
    state.watermark.get().await
}

#[derive(Deserialize)]
struct TailQuery {
    #[serde(default)]
    after: u64,
}

/// The live tail: every event of the run after `after` (a cursor, or the
/// `Last-Event-ID` of a reconnecting client) from the stream itself, in
/// order, then live; each SSE event's id is its cursor.
async fn stream_events(
    State(state): State<Arc<AppState>>,
    Path(run_id): Path<String>,
    Query(mut query): Query<TailQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let granted = state
        .auth
        .check(&headers, Scope::Stream)
        .map_err(IntoResponse::into_response)?;
    if let Some(refused) = refused_run_id(&run_id) {
        return Err(refused);
    }
    // Held as long as the tail is open.
    let permit = state
        .auth
        .stream_permit(&granted)
        .map_err(IntoResponse::into_response)?;
    // A reconnecting EventSource resumes from the last id it saw.
    if query.after == 0
        && let Some(last) = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        query.after = last;
    }
    let stream = state
        .js
        .get_stream(state.subjects.events_stream())
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let deliver_policy = if query.after == 0 {
        consumer::DeliverPolicy::All
    } else {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: query.after + 1,
        }
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: state.subjects.events_of_run(&run_id),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let max_diff = state.max_diff;
    let events = messages.filter_map(move |message| async move {
        let message = message.ok()?;
        let cursor = message.info().ok()?.stream_sequence;
        let event = AgentEvent::decode(message.payload.clone()).ok()?;
        let (data, truncated) = wire::data_json(&event, max_diff);
        let body = json!({
            "cursor": cursor, "event_id": event.event_id, "run_id": event.run_id, "seq": event.seq,
            "kind": event.kind, "at_ms": event.at_ms, "data": data, "truncated": truncated,
        });
        Some(Ok(Event::default()
            .id(cursor.to_string())
            .event(event.kind)
            .data(body.to_string())))
    });
    let events = events.map(move |event| {
        let _held = &permit;
        event
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if let Err(err) = sqlx::query("SELECT 1").execute(&state.pool).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("database: {err}"));
    }
    if state.nats.connection_state() != async_nats::connection::State::Connected {
        return error(StatusCode::SERVICE_UNAVAILABLE, "nats: not connected");
    }
    "ready".into_response()
}
