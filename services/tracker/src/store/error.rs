//! The store's error type. Database errors are sorted by what they mean for
//! the caller — someone else wrote it first, lost a race, the database is out
//! of reach — by their SQLSTATE and the shape of the sqlx error, here and
//! nowhere else; nothing reads an error's message to decide.

use corral_proto::v1::tracker_error::Refusal;

use crate::state::Illegal;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("run {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Illegal(#[from] Illegal),
    /// Refused, and why: `NotOwner` is a forbidden request, the others
    /// conflicts with the run's state.
    #[error("{1}")]
    Refused(Refusal, String),
    #[error("{0}")]
    Invalid(String),
    /// What should be new exists already (a unique violation, or a database
    /// that CREATE DATABASE found): another writer got there first.
    #[error("already exists: {0}")]
    Conflict(sqlx::Error),
    /// The transaction lost to a concurrent one and was rolled back
    /// (serialization failure, deadlock): the same request again may succeed.
    #[error("lost to a concurrent transaction: {0}")]
    Retryable(sqlx::Error),
    /// The database is out of reach: the connection failed or was lost, the
    /// pool timed out or is closed, or the server is shutting down or
    /// starting.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database the URL names does not exist (a fresh server).
    #[error("database does not exist: {0}")]
    NoDatabase(sqlx::Error),
    /// Any other database error.
    #[error("database error: {0}")]
    Db(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

// Each variant says its cause in its message, so none exposes it as a source.
corral_common::from_cause!(sqlx::migrate::MigrateError => StoreError::Migrate);

impl StoreError {
    /// Whether the same request may succeed later, so the caller should
    /// retry (answered `UNAVAILABLE`, a stop command nak'ed), as opposed to a
    /// request that is at fault or refused. Every database error counts as
    /// transient, as before the errors had types.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::NotFound(_)
            | StoreError::Illegal(_)
            | StoreError::Refused(..)
            | StoreError::Invalid(_) => false,
            StoreError::Conflict(_)
            | StoreError::Retryable(_)
            | StoreError::Unavailable(_)
            | StoreError::NoDatabase(_)
            | StoreError::Db(_)
            | StoreError::Migrate(_) => true,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        let code = match &err {
            sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
            _ => None,
        };
        variant(Kind::of(&err), code.as_deref())(err)
    }
}

/// The shape of a sqlx error, apart from its SQLSTATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The server answered with an error (and, usually, a SQLSTATE).
    Database,
    /// The connection or the pool failed: I/O, pool timed out or closed, a
    /// connection's worker crashed.
    Connection,
    /// Anything else (configuration, decoding, protocol, TLS, ...).
    Other,
}

impl Kind {
    fn of(err: &sqlx::Error) -> Kind {
        match err {
            sqlx::Error::Database(_) => Kind::Database,
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Kind::Connection,
            _ => Kind::Other,
        }
    }
}

// SQLSTATE codes (PostgreSQL, appendix A) the store tells apart.
const UNIQUE_VIOLATION: &str = "23505";
const DUPLICATE_DATABASE: &str = "42P04";
const SERIALIZATION_FAILURE: &str = "40001";
const DEADLOCK_DETECTED: &str = "40P01";
/// Class 08: the connection failed or was lost.
const CONNECTION_EXCEPTION_CLASS: &str = "08";
const ADMIN_SHUTDOWN: &str = "57P01";
const CRASH_SHUTDOWN: &str = "57P02";
const CANNOT_CONNECT_NOW: &str = "57P03";
const INVALID_CATALOG_NAME: &str = "3D000";

/// The variant a database error of `kind` with SQLSTATE `code` becomes.
fn variant(kind: Kind, code: Option<&str>) -> fn(sqlx::Error) -> StoreError {
    match (kind, code) {
        (Kind::Connection, _) => StoreError::Unavailable,
        (Kind::Other, _) | (Kind::Database, None) => StoreError::Db,
        (Kind::Database, Some(code)) => match code {
            UNIQUE_VIOLATION | DUPLICATE_DATABASE => StoreError::Conflict,
            SERIALIZATION_FAILURE | DEADLOCK_DETECTED => StoreError::Retryable,
            ADMIN_SHUTDOWN | CRASH_SHUTDOWN | CANNOT_CONNECT_NOW => StoreError::Unavailable,
            code if code.starts_with(CONNECTION_EXCEPTION_CLASS) => StoreError::Unavailable,
            INVALID_CATALOG_NAME => StoreError::NoDatabase,
            _ => StoreError::Db,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variant `kind` and `code` map to, as its name.
    fn mapped(kind: Kind, code: Option<&str>) -> &'static str {
        match variant(kind, code)(sqlx::Error::PoolClosed) {
            StoreError::Conflict(_) => "conflict",
            StoreError::Retryable(_) => "retryable",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::NoDatabase(_) => "no database",
            StoreError::Db(_) => "db",
            other => panic!("a database error mapped to {other:?}"),
        }
    }

    #[test]
    fn a_unique_violation_or_an_existing_database_is_a_conflict() {
        assert_eq!(mapped(Kind::Database, Some("23505")), "conflict");
        assert_eq!(mapped(Kind::Database, Some("42P04")), "conflict");
    }

    #[test]
    fn a_serialization_failure_or_a_deadlock_is_retryable() {
        assert_eq!(mapped(Kind::Database, Some("40001")), "retryable");
        assert_eq!(mapped(Kind::Database, Some("40P01")), "retryable");
    }

    #[test]
    fn a_lost_connection_or_a_server_going_away_is_unavailable() {
        for code in [
            "08000", "08003", "08006", "08001", "08P01", "57P01", "57P02", "57P03",
        ] {
            assert_eq!(mapped(Kind::Database, Some(code)), "unavailable", "{code}");
        }
        assert_eq!(mapped(Kind::Connection, None), "unavailable");
    }

    #[test]
    fn a_missing_database_is_told_apart() {
        assert_eq!(mapped(Kind::Database, Some("3D000")), "no database");
    }

    #[test]
    fn other_codes_and_other_errors_stay_plain_database_errors() {
        // Other members of the classes above are not what they name.
        for code in ["23503", "23514", "40002", "57014", "42601", "22P02"] {
            assert_eq!(mapped(Kind::Database, Some(code)), "db", "{code}");
        }
        assert_eq!(mapped(Kind::Database, None), "db");
        assert_eq!(mapped(Kind::Other, Some("23505")), "db");
    }

    #[test]
    fn the_tracker_says_a_database_cause_once() {
        // What `corral-tracker`'s main prints when PostgreSQL is out of
        // reach: anyhow's Debug, the message and its "Caused by" list.
        let err = crate::Error::from(StoreError::from(sqlx::Error::PoolTimedOut));
        let report = format!("{:?}", anyhow::Error::from(err));
        assert_eq!(report.matches("pool timed out").count(), 1, "{report}");
        assert!(
            report.starts_with("cannot open the database: database unavailable: pool timed out"),
            "{report}"
        );
    }

    #[test]
    fn the_connection_and_pool_errors_of_sqlx_are_unavailable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        for err in [
            sqlx::Error::Io(io),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
        ] {
            assert!(matches!(StoreError::from(err), StoreError::Unavailable(_)));
        }
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::Db(_)
        ));
    }

    /// A server's error carrying only a SQLSTATE.
    #[derive(Debug)]
    struct Answered(&'static str);

    impl std::fmt::Display for Answered {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for Answered {}

    impl sqlx::error::DatabaseError for Answered {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn a_server_error_is_mapped_by_its_sqlstate() {
        let answered = |code| StoreError::from(sqlx::Error::Database(Box::new(Answered(code))));
        assert!(matches!(answered("23505"), StoreError::Conflict(_)));
        assert!(matches!(answered("40P01"), StoreError::Retryable(_)));
        assert!(matches!(answered("57P01"), StoreError::Unavailable(_)));
        assert!(matches!(answered("3D000"), StoreError::NoDatabase(_)));
        assert!(matches!(answered("42601"), StoreError::Db(_)));
    }

    #[test]
    fn every_database_error_is_transient_and_refusals_are_not() {
        let transient = [
            StoreError::Conflict(sqlx::Error::PoolClosed),
            StoreError::Retryable(sqlx::Error::PoolClosed),
            StoreError::Unavailable(sqlx::Error::PoolClosed),
            StoreError::NoDatabase(sqlx::Error::PoolClosed),
            StoreError::Db(sqlx::Error::PoolClosed),
        ];
        assert!(transient.iter().all(StoreError::is_transient));
        let permanent = [
            StoreError::NotFound("r".into()),
            StoreError::Refused(Refusal::StopRequested, "stop requested".into()),
            StoreError::Invalid("bad".into()),
        ];
        assert!(!permanent.iter().any(StoreError::is_transient));
    }
}
