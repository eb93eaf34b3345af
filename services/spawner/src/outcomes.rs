//! A run's outcome is recorded however long the tracker or PostgreSQL is
//! away. The owner retries the transition that reports it (a turn's end, a
//! run's end) with capped backoff until the tracker records or refuses it.
//! If the spawner must exit first (its drain is over), the outcome is kept
//! in `<home>/outcomes/<run_id>.pb` and the next spawner started with the
//! same home records it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_client::ClientError;
use corral_proto::v1::{Run, TransitionRequest};
use prost::Message;

use crate::Spawner;

/// The longest wait between two tries: an outcome reaches the tracker
/// within about this long after it is back.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Records `request`, retrying transient failures until the tracker
/// answers or the spawner must exit (then the outcome is kept on disk and
/// the last error returned).
pub(crate) async fn record(
    spawner: &Spawner,
    request: &TransitionRequest,
) -> Result<Run, ClientError> {
    let outcome = retry(
        &request.run_id,
        || spawner.client.transition(request),
        spawner.exiting.cancelled(),
    )
    .await;
    if outcome.as_ref().is_err_and(ClientError::is_transient) {
        // Only an exit ends the retries of a transient failure.
        keep(&spawner.outcomes_dir(), request);
    }
    outcome
}

/// Retries a tracker request whose failure is transient until the tracker
/// answers or the spawner must exit: what a run's owner reports (its
/// sandbox, its start, its finalize) is not given up because the tracker
/// or PostgreSQL is away for a while.
pub(crate) async fn until_answered<T, F, Fut>(
    spawner: &Spawner,
    what: &str,
    request: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let give_up = async {
        tokio::select! {
            _ = spawner.exiting.cancelled() => {}
            _ = spawner.end_runs.cancelled() => {}
        }
    };
    retry(what, request, give_up).await
}

/// `request` again, with capped backoff, while it fails transiently and
/// `give_up` has not resolved.
async fn retry<T, F, Fut>(
    what: &str,
    mut request: F,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    tokio::pin!(give_up);
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    let mut err = match request().await {
        Ok(answer) => return Ok(answer),
        Err(err) if !err.is_transient() => return Err(err),
        Err(err) => err,
    };
    loop {
        attempts += 1;
        if attempts == 1 || attempts.is_multiple_of(30) {
            tracing::warn!(what, attempts, error = %err, "tracker unavailable; retrying until it answers");
        }
        tokio::select! {
            _ = &mut give_up => return Err(err),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_DELAY);
        // Giving up does not wait out a request in flight (up to the
        // request timeout): it returns the failure before it.
        err = tokio::select! {
            answer = request() => match answer {
                Ok(answer) => return Ok(answer),
                Err(err) if !err.is_transient() => return Err(err),
                Err(err) => err,
            },
            _ = &mut give_up => return Err(err),
        };
    }
}

fn file_of(dir: &Path, run_id: &str) -> PathBuf {
    dir.join(format!("{run_id}.pb"))
}

/// Writes the outcome durably (a temporary file, synced, then renamed).
fn keep(dir: &Path, request: &TransitionRequest) {
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let path = file_of(dir, &request.run_id);
        let partial = path.with_extension("partial");
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(&request.encode_to_vec())?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    match write() {
        Ok(()) => {
            metrics::counter!("corral_outcomes_kept_total").increment(1);
            tracing::warn!(run_id = %request.run_id, dir = %dir.display(), "spawner exiting: outcome kept on disk for the next spawner to record");
        }
        Err(err) => {
            tracing::error!(run_id = %request.run_id, error = %err, "outcome could not be kept; the reaper will end the run")
        }
    }
}

/// Records the outcomes an earlier spawner with this home kept; each file
/// goes once the tracker recorded or refused it (a refusal: the run ended
/// otherwise meanwhile, e.g. the reaper judged it).
pub(crate) async fn replay(spawner: &Spawner) {
    let dir = spawner.outcomes_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pb") {
            continue;
        }
        let request = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| TransitionRequest::decode(&bytes[..]).map_err(|e| e.to_string()))
        {
            Ok(request) => request,
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "kept outcome unreadable; left in place");
                continue;
            }
        };
        match record(spawner, &request).await {
            Ok(_) => {
                tracing::info!(run_id = %request.run_id, "kept outcome recorded");
                let _ = std::fs::remove_file(&path);
            }
            Err(err) if !err.is_transient() => {
                tracing::warn!(run_id = %request.run_id, error = %err, "kept outcome refused: the run ended otherwise");
                let _ = std::fs::remove_file(&path);
            }
            // Exiting again: it is still on disk.
            Err(_) => return,
        }
    }
}
