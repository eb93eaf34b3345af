//! All of event-ingest's SQL: bulk, idempotent inserts, cursor reads, and
//! what GenAI traces read of a run (its history and events).

use serde_json::Value;
use sqlx::PgPool;

/// A decoded event ready to store.
pub struct Row {
    pub event_id: String,
    pub run_id: String,
    pub stream_seq: i64,
    pub seq: i64,
    pub kind: String,
    pub at_ms: i64,
    pub data: Value,
    pub truncated: bool,
}

/// Whether a failed statement may succeed when tried again as it is: the
/// database unreachable, restarting, out of resources, or the transaction
/// rolled back (SQLSTATE classes 08, 40, 53, 57, 58; any error that is not
/// the database's answer). Anything else is the data's fault.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        _ => true,
    }
}

/// Inserts `rows` in one statement; an event already stored (same run and
/// event_id) is skipped. Returns how many rows were new.
pub async fn insert(pool: &PgPool, rows: &[Row]) -> Result<u64, sqlx::Error> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut runs = Vec::with_capacity(rows.len());
    let mut stream_seqs = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    let mut ats = Vec::with_capacity(rows.len());
    let mut datas = Vec::with_capacity(rows.len());
    let mut truncated = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.event_id.as_str());
        runs.push(row.run_id.as_str());
        stream_seqs.push(row.stream_seq);
        seqs.push(row.seq);
        kinds.push(row.kind.as_str());
        // Seconds since the epoch, as `to_timestamp` takes them.
        ats.push(row.at_ms as f64 / 1000.0);
        datas.push(row.data.to_string());
        truncated.push(row.truncated);
    }
    let done = sqlx::query(
        "INSERT INTO sandbox_events (event_id, run_id, stream_seq, seq, kind, at, payload, truncated)
         SELECT id, run, sseq, seq, kind, to_timestamp(at), data::jsonb, cut
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::float8[], $7::text[], $8::bool[])
              AS t(id, run, sseq, seq, kind, at, data, cut)
         ON CONFLICT (run_id, event_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&runs)
    .bind(&stream_seqs)
    .bind(&seqs)
    .bind(&kinds)
    .bind(&ats)
    .bind(&datas)
    .bind(&truncated)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Events of a run after `after` and up to `watermark` (stream sequences),
/// oldest first, as the JSON the HTTP API serves.
pub async fn page(
    pool: &PgPool,
    run_id: &str,
    after: i64,
    watermark: i64,
    kind: Option<&str>,
    limit: i64,
) -> Result<Vec<Value>, sqlx::Error> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT jsonb_build_object(
                    'cursor', stream_seq, 'event_id', event_id, 'run_id', run_id, 'seq', seq, 'kind', kind,
                    'at_ms', (extract(epoch FROM at) * 1000)::bigint, 'data', payload, 'truncated', truncated)
         FROM sandbox_events
         WHERE run_id = $1 AND stream_seq > $2 AND stream_seq <= $5
           AND ($3::text IS NULL OR kind = $3)
         ORDER BY stream_seq
         LIMIT $4",
    )
    .bind(run_id)
    .bind(after)
    .bind(kind)
    .bind(limit)
    .bind(watermark)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(v,)| v).collect())
}

/// One row of a run's history (`run_transitions`, the tracker's table in
/// the same database), as GenAI traces show it.
#[derive(Clone, Debug)]
pub struct Transition {
    pub from_state: Option<String>,
    pub to_state: String,
    pub event: String,
    pub reason: String,
    pub actor: String,
    pub at_ms: i64,
    pub sandbox_id: Option<String>,
}

/// The history of `run_id`, oldest first.
pub async fn transitions(pool: &PgPool, run_id: &str) -> Result<Vec<Transition>, sqlx::Error> {
    type Columns = (
        Option<String>,
        String,
        String,
        String,
        String,
        i64,
        Option<String>,
    );
    let rows: Vec<Columns> = sqlx::query_as(
        "SELECT from_state, to_state, event, reason, actor,
                (extract(epoch FROM at) * 1000)::bigint, sandbox_id
         FROM run_transitions WHERE run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(from_state, to_state, event, reason, actor, at_ms, sandbox_id)| Transition {
                from_state,
                to_state,
                event,
                reason,
                actor,
                at_ms,
                sandbox_id,
            },
        )
        .collect())
}

/// A stored event as GenAI traces read it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub event_id: String,
    pub kind: String,
    pub at_ms: i64,
    pub data: Value,
}

/// The first `limit` stored events of `run_id` of the given kinds, in
/// stream order.
pub async fn events_of_kinds(
    pool: &PgPool,
    run_id: &str,
    kinds: &[&str],
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows: Vec<(String, String, i64, Value)> = sqlx::query_as(
        "SELECT event_id, kind, (extract(epoch FROM at) * 1000)::bigint, payload
         FROM sandbox_events
         WHERE run_id = $1 AND kind = ANY($2)
         ORDER BY stream_seq
         LIMIT $3",
    )
    .bind(run_id)
    .bind(kinds)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(event_id, kind, at_ms, data)| StoredEvent {
            event_id,
            kind,
            at_ms,
            data,
        })
        .collect())
}
