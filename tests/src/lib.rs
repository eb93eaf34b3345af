//! The end-to-end harness: each test gets its own database (random name,
//! migrations applied by the tracker), its own subject prefix on the shared
//! NATS server (so its streams are its own) and its own sandbox directory
//! ([`TestEnv`], in `env`), and runs the services in-process or as real
//! processes when it must kill one (`services`). `waits` holds the waits
//! for runs, `streams` reads the test's streams back, `auth` the keys and
//! HTTP client the tests authenticate with, and `private` the servers of a
//! test's own ([`PrivatePostgres`], [`PrivateNats`]) that it may stop and
//! start. `TestEnv::cleanup` deletes the streams and drops the database.
//!
//! NATS_URL (default nats://127.0.0.1:4222) must be a server with JetStream;
//! DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres) a role
//! that may create databases.

mod auth;
mod env;
mod private;
mod services;
mod streams;
mod waits;

pub mod browser;
pub mod cluster;
pub mod sessions;

pub use auth::{API_KEY, TOKEN_SECRET, api_key_env, api_keys, http};
pub use corral_provider::local::processes_with_cmdline;
pub use env::{SHARED_IN_SANDBOX, TestEnv, admin_database_url, nats_url};
pub use private::{PrivateNats, PrivatePostgres};
pub use services::{InProcess, ServiceProcess, corral_bin};
pub use streams::subject_matches;
pub use waits::{eventually, tracker_answers};

fn random_suffix() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    id[id.len() - 10..].to_owned()
}

/// Most pages a test reads before deciding the paging never ends.
pub const MAX_PAGES: usize = 1000;

/// A number for a test's unique `sleep N` command lines, so a check by
/// command line finds this test's processes and no other's.
pub fn unique_secs() -> u32 {
    100_000 + rand::random_range(0..800_000)
}
