//! What every corral service shares: telemetry, shutdown, layered
//! configuration and NATS plumbing (connect, streams, traced publish,
//! request-reply, dead letters), and [`delivery::Delivery`], the one way a
//! consumer handles a message.

pub mod admin;
pub mod config;
pub mod delivery;
pub mod fault;
pub mod limits;
pub mod nats;
pub mod nats_roles;
pub mod shutdown;
pub mod streams;
pub mod telemetry;
pub mod token;

/// `impl From<Cause> for Error`, through a variant whose message already
/// says the cause (`#[error("database: {0}")] Db(sqlx::Error)`).
///
/// corral's errors say their cause in their own message, because logs print
/// them with `%err`; so they do not also expose it as `source()`, which
/// would make anyhow's `{:#}` and a `main`'s "Caused by" list say it a
/// second time. thiserror's `#[from]` always exposes it; this does not.
#[macro_export]
macro_rules! from_cause {
    ($($cause:ty => $error:ident :: $variant:ident),+ $(,)?) => {$(
        impl From<$cause> for $error {
            fn from(cause: $cause) -> Self {
                $error::$variant(cause)
            }
        }
    )+};
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A value that never prints: connection strings with passwords, tokens.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}
