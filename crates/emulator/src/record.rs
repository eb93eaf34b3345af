//! What passed between a client and an emulator, for conformance tests:
//! every request and the answer to it, bodies included (a streamed answer
//! as far as it was sent). Off until [`Recorder::start`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

/// Bodies larger than this are not recorded whole (the rest is dropped).
const MAX_RECORDED_BODY: usize = 4 * 1024 * 1024;

/// One request and its answer.
#[derive(Clone, Debug, Default)]
pub struct Exchange {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Request headers, names lower case.
    pub headers: Vec<(String, String)>,
    pub request_body: Bytes,
    pub status: u16,
    pub response_content_type: Option<String>,
    /// As much of the answer as was sent.
    pub response_body: Vec<u8>,
}

/// The exchanges of one emulator, in the order the requests came.
#[derive(Default)]
pub struct Recorder {
    on: AtomicBool,
    exchanges: Mutex<Vec<Arc<Mutex<Exchange>>>>,
}

impl Recorder {
    /// Records from now on.
    pub fn start(&self) {
        self.on.store(true, Ordering::SeqCst);
    }

    /// Copies of what was recorded so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        let exchanges = self.exchanges.lock().unwrap_or_else(|p| p.into_inner());
        exchanges
            .iter()
            .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }
}

/// The middleware: passes everything on, copying it when recording.
pub(crate) async fn tap(
    State(recorder): State<Arc<Recorder>>,
    request: Request,
    next: Next,
) -> Response {
    if !recorder.on.load(Ordering::SeqCst) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let request_body = match axum::body::to_bytes(body, MAX_RECORDED_BODY).await {
        Ok(bytes) => bytes,
        Err(err) => {
            let message = format!("request body unreadable: {err}");
            return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
        }
    };
    let exchange = Arc::new(Mutex::new(Exchange {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect(),
        request_body: request_body.clone(),
        ..Exchange::default()
    }));
    recorder
        .exchanges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(exchange.clone());
    let request = Request::from_parts(parts, Body::from(request_body));
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    {
        let mut e = exchange.lock().unwrap_or_else(|p| p.into_inner());
        e.status = parts.status.as_u16();
        e.response_content_type = parts
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
    let copied = body.into_data_stream().inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            let mut e = exchange.lock().unwrap_or_else(|p| p.into_inner());
            let room = MAX_RECORDED_BODY.saturating_sub(e.response_body.len());
            e.response_body
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    });
    Response::from_parts(parts, Body::from_stream(copied))
}
