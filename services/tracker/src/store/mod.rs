//! The tracker's SQL for runs, one file per concern. Every change to a run
//! is a compare-and-set on its `version`, decided by [`crate::state::next`]
//! and guarded by the fence (`fence.rs`), and records a row in
//! `run_transitions` in the same statement: the run's history and the
//! lifecycle outbox ([`crate::relay`] announces the rows).
//!
//! - `mod.rs`: the [`Store`], connecting and migrating;
//! - `error.rs`: [`StoreError`], database errors sorted by SQLSTATE;
//! - `rows.rs`: the `runs` row and its mapping to the proto `Run`;
//! - `fence.rs`: when a transition may apply, in SQL and in words, in one place;
//! - `transitions.rs`: submit, claim, record a sandbox, apply an event, release;
//! - `stops.rs`: durable stop requests;
//! - `reads.rs`: one run, lists, spawners, and cost;
//! - `sweep.rs`: what the reaper acts on, and the liveness it is judged by.

mod error;
mod fence;
mod reads;
mod rows;
mod stops;
mod sweep;
mod transitions;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use error::StoreError;
pub use transitions::Applied;

/// Defaults applied to a run's spec when its fields are zero.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub timeout_secs: i32,
    pub idle_timeout_secs: i32,
    /// Kept runs: idle seconds before the sandbox is paused.
    pub idle_pause_secs: i32,
    /// Kept runs: the session's lifetime, seconds.
    pub max_lifetime_secs: i32,
}

/// How often a compare-and-set is retried when another writer raced it.
const CAS_ATTEMPTS: usize = 8;

/// The tracker's database: a pool, the defaults a submitted run's spec
/// falls back on, and the prices its cost is figured at.
pub struct Store {
    pool: PgPool,
    defaults: Defaults,
    prices: crate::cost::Prices,
}

impl Store {
    /// Connects and applies the migrations.
    pub async fn connect(
        database_url: &str,
        pool_size: u32,
        defaults: Defaults,
        prices: crate::cost::Prices,
    ) -> Result<Store, StoreError> {
        let options: PgConnectOptions = database_url.parse()?;
        let connect = || {
            PgPoolOptions::new()
                .max_connections(pool_size)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
        };
        let pool = match connect().await.map_err(StoreError::from) {
            Err(StoreError::NoDatabase(_)) => {
                create_database(&options).await?;
                connect().await?
            }
            other => other?,
        };
        // Event ingest keeps its own migrations in the same table.
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        Ok(Store {
            pool,
            defaults,
            prices,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether PostgreSQL answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Creates the database `options` names (a fresh machine has none), through
/// the server's `postgres` maintenance database.
async fn create_database(options: &PgConnectOptions) -> Result<(), StoreError> {
    use sqlx::Connection;
    let name = options.get_database().unwrap_or("corral").to_owned();
    tracing::info!(database = %name, "creating the database");
    let mut conn = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match sqlx::query(&format!("CREATE DATABASE {quoted}"))
        .execute(&mut conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(err) => match StoreError::from(err) {
            // Another instance created it first: the database exists, or
            // (racing CREATE DATABASE) its name's unique index refused ours.
            StoreError::Conflict(_) => Ok(()),
            err => Err(err),
        },
    }
}
