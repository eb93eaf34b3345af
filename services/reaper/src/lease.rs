//! One active reaper: a lease in a JetStream KV bucket whose entries expire
//! after the TTL. The leader renews with a revision-checked update every
//! third of the TTL; a standby creates the key once it expired. A renewal
//! that finds another revision means the lease was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use tokio_util::sync::CancellationToken;

const KEY: &str = "leader";

pub struct Lease {
    store: kv::Store,
    id: String,
    ttl: Duration,
    leader: Arc<AtomicBool>,
}

impl Lease {
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        id: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Lease, String> {
        // The bucket's stream is provisioned here, as a KV bucket's stream
        // is laid out (subjects `$KV.<bucket>.>`, one message per subject,
        // entries expiring after the TTL): the client's own bucket creation
        // sends settings a 2.9 server does not answer in the form it expects.
        // It keeps as many copies as the most replicated stream: on a
        // cluster the lease outlives the loss of a node.
        let stream = stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("corral reaper leader lease".into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        // A cluster electing leaders answers late for a while: waited out,
        // as for every stream (a reaper that gave up here would not run).
        corral_common::streams::get_or_create_patiently(js, stream)
            .await
            .map_err(|e| format!("cannot create lease bucket {bucket}: {e}"))?;
        let store = js
            .get_key_value(bucket)
            .await
            .map_err(|e| format!("cannot open lease bucket {bucket}: {e}"))?;
        Ok(Lease {
            store,
            id: id.to_owned(),
            ttl,
            leader: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Shared flag: true while this instance holds the lease.
    pub fn leader_flag(&self) -> Arc<AtomicBool> {
        self.leader.clone()
    }

    /// Holds or waits for the lease until `shutdown`; releases it then.
    pub async fn run(self, shutdown: CancellationToken) {
        let period = self.ttl / 3;
        let mut revision: Option<u64> = None;
        loop {
            revision = match revision {
                Some(rev) => match self.store.update(KEY, self.id.clone().into(), rev).await {
                    Ok(next) => Some(next),
                    Err(err) => {
                        tracing::warn!(reaper_id = %self.id, error = %err, "reaper lease lost");
                        None
                    }
                },
                None => match self.store.create(KEY, self.id.clone().into()).await {
                    Ok(rev) => {
                        tracing::info!(reaper_id = %self.id, "reaper lease taken: this instance sweeps");
                        Some(rev)
                    }
                    Err(_) => None,
                },
            };
            self.leader.store(revision.is_some(), Ordering::SeqCst);
            // 1 on the instance that sweeps: across the reapers, exactly one.
            metrics::gauge!("corral_reaper_leader").set(f64::from(u8::from(revision.is_some())));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(period) => {}
            }
        }
        if revision.is_some() {
            self.leader.store(false, Ordering::SeqCst);
            metrics::gauge!("corral_reaper_leader").set(0.0);
            // Hand over at once instead of after the TTL.
            let _ = self.store.delete(KEY).await;
        }
    }
}
