//! corral's wire contract, defined once.
//!
//! - [`v1`]: the protobuf messages of package `corral.v1`, generated from
//!   `proto/corral/v1/*.proto`.
//! - [`Subjects`]: every NATS subject, stream, consumer and KV bucket name,
//!   derived from one configurable prefix so several deployments (and
//!   parallel tests) share one NATS server.
//! - [`headers`]: the NATS header names corral sets.
//!
//! Nothing else in corral spells a subject.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/corral.v1.rs"));
}

pub mod kinds;
mod states;
mod subjects;
pub mod validate;

pub use subjects::{PrefixError, RunIdError, Subjects, validate_run_id};

/// NATS header names.
pub mod headers {
    /// JetStream de-duplication id (the run id, event id or stop id).
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// On a dead-lettered message: why it was rejected.
    pub const DLQ_ERROR: &str = "Corral-Error";
    /// On a dead-lettered message: the subject it was first published on.
    pub const DLQ_ORIGINAL_SUBJECT: &str = "Corral-Original-Subject";
    /// On a dead-lettered message: how many times it was delivered.
    pub const DLQ_DELIVERIES: &str = "Corral-Deliveries";
    /// On a dead-lettered message: its original `Nats-Msg-Id`.
    pub const DLQ_ORIGINAL_MSG_ID: &str = "Corral-Original-Msg-Id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}
