//! The sandboxes an emulator holds: records over real ones of a
//! [`LocalProvider`], each with the API's own data (`X`) and an expiry.
//!
//! A sandbox past its expiry is expired on the next access or by the
//! sweeper, whichever comes first: it leaves the records at once (the API
//! answers "not found" or "gone" from then on) and its processes are killed
//! right after.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use corral_provider::{CreateSpec, Labels, LocalProvider, Provider, ProviderError};

/// How often the sweeper looks for expired sandboxes.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

pub(crate) struct Sandbox<X> {
    pub id: String,
    pub labels: Labels,
    pub started_at: DateTime<Utc>,
    /// `None`: never expires.
    pub expires_at: Option<Instant>,
    pub paused: bool,
    pub api: X,
}

impl<X> Sandbox<X> {
    /// Sets the expiry `lifetime` from now (`None`: never).
    pub fn expire_in(&mut self, lifetime: Option<Duration>) {
        self.expires_at = lifetime.map(|lifetime| Instant::now() + lifetime);
    }

    /// The expiry as a wall-clock time, for APIs that report it.
    pub fn end_at(&self) -> Option<DateTime<Utc>> {
        let left = self.expires_at?.saturating_duration_since(Instant::now());
        Some(Utc::now() + chrono::Duration::from_std(left).unwrap_or_default())
    }

    fn overdue(&self, now: Instant) -> bool {
        !self.paused && self.expires_at.is_some_and(|at| at <= now)
    }
}

/// What a lookup found.
pub(crate) enum Lookup<T> {
    Live(T),
    /// Expired (by time or [`Sandboxes::expire`]).
    Expired,
    /// Never existed, or killed.
    Unknown,
}

pub(crate) struct Sandboxes<X> {
    local: LocalProvider,
    records: Mutex<Records<X>>,
    created: AtomicUsize,
    runtime: tokio::runtime::Handle,
}

struct Records<X> {
    live: HashMap<String, Sandbox<X>>,
    expired: HashSet<String>,
}

impl<X: Send + 'static> Sandboxes<X> {
    /// Sandboxes under `home`, with a sweeper that ends with them.
    pub fn start(home: &Path) -> std::io::Result<Arc<Sandboxes<X>>> {
        let sandboxes = Arc::new(Sandboxes {
            local: LocalProvider::new(home, &corral_provider::LocalConfig::unisolated())
                .map_err(std::io::Error::other)?,
            records: Mutex::new(Records {
                live: HashMap::new(),
                expired: HashSet::new(),
            }),
            created: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(sweep(Arc::downgrade(&sandboxes)));
        Ok(sandboxes)
    }

    pub fn local(&self) -> &LocalProvider {
        &self.local
    }

    /// How many creates succeeded, whether or not the client heard of it.
    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records<X>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a real sandbox and its record; returns its id.
    pub async fn create(
        &self,
        labels: Labels,
        lifetime: Option<Duration>,
        api: X,
    ) -> Result<String, ProviderError> {
        let spec = CreateSpec {
            labels: labels.clone(),
            ..CreateSpec::default()
        };
        let info = self.local.create(&spec).await?;
        let mut sandbox = Sandbox {
            id: info.id.clone(),
            labels,
            started_at: Utc::now(),
            expires_at: None,
            paused: false,
            api,
        };
        sandbox.expire_in(lifetime);
        self.lock().live.insert(info.id.clone(), sandbox);
        self.created.fetch_add(1, Ordering::SeqCst);
        Ok(info.id)
    }

    /// Runs `f` on a live sandbox, expiring it first if it is overdue.
    pub fn with<T>(&self, id: &str, f: impl FnOnce(&mut Sandbox<X>) -> T) -> Lookup<T> {
        let mut records = self.lock();
        let overdue = records
            .live
            .get(id)
            .is_some_and(|s| s.overdue(Instant::now()));
        if overdue {
            self.expire_locked(&mut records, id);
        }
        let records = &mut *records;
        match records.live.get_mut(id) {
            Some(sandbox) => Lookup::Live(f(sandbox)),
            None if records.expired.contains(id) => Lookup::Expired,
            None => Lookup::Unknown,
        }
    }

    /// Removes a live sandbox's record and kills it.
    pub async fn kill(&self, id: &str) -> Lookup<()> {
        let found = {
            let mut records = self.lock();
            match records.live.remove(id) {
                Some(_) => Lookup::Live(()),
                None if records.expired.contains(id) => Lookup::Expired,
                None => Lookup::Unknown,
            }
        };
        if let Lookup::Live(()) = found
            && let Err(err) = self.local.kill(id).await
        {
            tracing::warn!(sandbox_id = %id, error = %err, "emulated sandbox kill failed");
        }
        found
    }

    /// `f` of every live sandbox it answers `Some` for, by id.
    pub fn list<T>(&self, mut f: impl FnMut(&Sandbox<X>) -> Option<T>) -> Vec<T> {
        self.sweep_now();
        let records = self.lock();
        let mut sandboxes: Vec<&Sandbox<X>> = records.live.values().collect();
        sandboxes.sort_by(|a, b| a.id.cmp(&b.id));
        sandboxes.into_iter().filter_map(&mut f).collect()
    }

    pub fn live_ids(&self) -> Vec<String> {
        self.list(|s| Some(s.id.clone()))
    }

    /// As if its timeout passed now.
    pub fn expire(&self, id: &str) {
        let mut records = self.lock();
        self.expire_locked(&mut records, id);
    }

    fn expire_locked(&self, records: &mut Records<X>, id: &str) {
        if records.live.remove(id).is_none() {
            return;
        }
        records.expired.insert(id.to_owned());
        tracing::debug!(sandbox_id = %id, "emulated sandbox expired");
        let local = self.local.clone();
        let id = id.to_owned();
        self.runtime.spawn(async move {
            if let Err(err) = local.kill(&id).await {
                tracing::warn!(sandbox_id = %id, error = %err, "expired sandbox kill failed");
            }
        });
    }

    fn sweep_now(&self) {
        let mut records = self.lock();
        let now = Instant::now();
        let overdue: Vec<String> = records
            .live
            .values()
            .filter(|s| s.overdue(now))
            .map(|s| s.id.clone())
            .collect();
        for id in overdue {
            self.expire_locked(&mut records, &id);
        }
    }
}

impl<X> Drop for Sandboxes<X> {
    /// Kills what is left at once: a test that ends early must not leave
    /// processes behind, and no runtime may be left to run a kill task.
    fn drop(&mut self) {
        let records = self.records.get_mut().unwrap_or_else(|p| p.into_inner());
        for id in records.live.keys() {
            for pid in LocalProvider::live_processes(id) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

async fn sweep<X: Send + 'static>(sandboxes: Weak<Sandboxes<X>>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let Some(sandboxes) = sandboxes.upgrade() else {
            return;
        };
        sandboxes.sweep_now();
    }
}
