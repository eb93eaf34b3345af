//! Fault injection: what the next requests to an emulator suffer. A test
//! sets faults through [`Faults`] while the server reads them, so every
//! method takes `&self`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Faults an emulator injects; shared with its server.
#[derive(Debug, Default)]
pub struct Faults {
    state: Mutex<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    failures: usize,
    failure_status: u16,
    rate_limited: usize,
    delay: Duration,
    lost_creates: usize,
    refused_creates: usize,
    /// Creates refused so far (served faults, for tests to confirm).
    creates_refused: usize,
    /// Requests answered by [`Faults::fail_next`] so far.
    failures_served: usize,
}

impl Faults {
    /// The next `n` requests answer `status` (e.g. 503) and do nothing.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut state = self.lock();
        state.failures = n;
        state.failure_status = status;
    }

    /// The next `n` requests answer 429 with `Retry-After: 0` and do nothing.
    pub fn rate_limit_next(&self, n: usize) {
        self.lock().rate_limited = n;
    }

    /// Every request waits `d` before it is handled.
    pub fn delay(&self, d: Duration) {
        self.lock().delay = d;
    }

    /// The next `n` creates do create the sandbox, then answer 502: the
    /// client never learns the id.
    pub fn lose_next_creates(&self, n: usize) {
        self.lock().lost_creates = n;
    }

    /// The next `n` creates answer 503 and create nothing (a provider out
    /// of capacity).
    pub fn refuse_next_creates(&self, n: usize) {
        self.lock().refused_creates = n;
    }

    /// How many creates were refused by [`Faults::refuse_next_creates`].
    pub fn creates_refused(&self) -> usize {
        self.lock().creates_refused
    }

    /// How many requests were answered by [`Faults::fail_next`].
    pub fn failures_served(&self) -> usize {
        self.lock().failures_served
    }

    /// No more faults (the counts stay).
    pub fn clear(&self) {
        let mut state = self.lock();
        let (refused, served) = (state.creates_refused, state.failures_served);
        *state = FaultState::default();
        state.creates_refused = refused;
        state.failures_served = served;
    }

    /// Whether the create being answered loses its response.
    pub(crate) fn take_lost_create(&self) -> bool {
        take(&mut self.lock().lost_creates)
    }

    /// The answer for a create to refuse, if it is one.
    pub(crate) fn take_refused_create(&self) -> Option<Response> {
        let mut state = self.lock();
        if !take(&mut state.refused_creates) {
            return None;
        }
        state.creates_refused += 1;
        Some(injected(StatusCode::SERVICE_UNAVAILABLE))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delay to wait, and the response to give instead of handling.
    fn before_request(&self) -> (Duration, Option<Response>) {
        let mut state = self.lock();
        let delay = state.delay;
        if take(&mut state.rate_limited) {
            let mut response = injected(StatusCode::TOO_MANY_REQUESTS);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("0"));
            return (delay, Some(response));
        }
        if take(&mut state.failures) {
            state.failures_served += 1;
            let status = StatusCode::from_u16(state.failure_status)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return (delay, Some(injected(status)));
        }
        (delay, None)
    }
}

fn take(count: &mut usize) -> bool {
    let due = *count > 0;
    *count = count.saturating_sub(1);
    due
}

fn injected(status: StatusCode) -> Response {
    let body = json!({ "code": status.as_u16(), "message": "injected fault" });
    (status, axum::Json(body)).into_response()
}

/// Middleware: applies the faults before any handler runs.
pub(crate) async fn inject(
    State(faults): State<Arc<Faults>>,
    request: Request,
    next: Next,
) -> Response {
    let (delay, fault) = faults.before_request();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(response) => response,
        None => next.run(request).await,
    }
}
