//! What the console reads besides the tracker's answers and a run's
//! transitions (`crate::store::transitions`): the nodes with the runs each
//! owns, and the newest dead letters.

use std::collections::BTreeMap;

use async_nats::jetstream;
use corral_client::Client;
use corral_proto::v1::{ListRunsRequest, Run, RunState, Spawner};
use corral_proto::{Subjects, headers};

/// The spawners the tracker knows, and the live runs each owns.
pub(crate) struct Nodes {
    pub spawners: Vec<Spawner>,
    pub owned: BTreeMap<String, Vec<Run>>,
    /// Live runs no spawner holds (queued, or between owners).
    pub unowned: Vec<Run>,
}

/// Live runs the nodes view lists, at most.
const LIVE_MAX: u32 = 1000;

pub(crate) async fn nodes(client: &Client) -> Result<Nodes, String> {
    let spawners = client
        .spawners()
        .await
        .map_err(|err| format!("the tracker did not answer: {err}"))?;
    let live: Vec<i32> = RunState::ALL
        .into_iter()
        .filter(|state| !state.is_terminal())
        .map(|state| state as i32)
        .collect();
    let runs = client
        .list(&ListRunsRequest {
            states: live,
            limit: LIVE_MAX,
            ..Default::default()
        })
        .await
        .map_err(|err| format!("the tracker did not answer: {err}"))?;
    let mut owned: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    let mut unowned = Vec::new();
    for run in runs {
        if run.owner.is_empty() {
            unowned.push(run);
        } else {
            owned.entry(run.owner.clone()).or_default().push(run);
        }
    }
    Ok(Nodes {
        spawners,
        owned,
        unowned,
    })
}

/// One dead letter as the console lists it.
pub(crate) struct DeadLetter {
    pub seq: u64,
    pub time: String,
    pub kind: String,
    pub original_subject: String,
    pub error: String,
    pub deliveries: String,
    pub bytes: usize,
}

/// The newest `limit` dead letters, newest first.
pub(crate) async fn dead_letters(
    js: &jetstream::Context,
    subjects: &Subjects,
    limit: usize,
) -> Result<Vec<DeadLetter>, String> {
    let mut stream = js
        .get_stream(subjects.dlq_stream())
        .await
        .map_err(|err| format!("dead-letter stream: {err}"))?;
    let info = stream
        .info()
        .await
        .map_err(|err| format!("dead-letter stream: {err}"))?
        .clone();
    let mut letters = Vec::new();
    if info.state.messages == 0 {
        return Ok(letters);
    }
    let kind_prefix = subjects.dlq("");
    let mut seq = info.state.last_sequence;
    while seq >= info.state.first_sequence && letters.len() < limit {
        // Replayed letters are deleted: gaps.
        if let Ok(letter) = stream.get_raw_message(seq).await {
            let header = |name: &str| {
                letter
                    .headers
                    .get(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            letters.push(DeadLetter {
                seq,
                time: letter.time.to_string(),
                kind: letter
                    .subject
                    .as_str()
                    .strip_prefix(kind_prefix.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                original_subject: header(headers::DLQ_ORIGINAL_SUBJECT),
                error: header(headers::DLQ_ERROR),
                deliveries: header(headers::DLQ_DELIVERIES),
                bytes: letter.payload.len(),
            });
        }
        if seq == 0 {
            break;
        }
        seq -= 1;
    }
    Ok(letters)
}
