//! One delivered command, as the command loop and the session handlers both
//! take it: decoded and validated into a [`Delivery`] (what is neither goes
//! to `<prefix>.dlq.cmd` with the reason), and the claim horizon within
//! which a command that failed for a transient reason is tried again.

use std::time::Duration;

use async_nats::jetstream;
use corral_common::delivery::{DeadLetters, Delivery};
use prost::Message;

use crate::Spawner;

/// Where commands this spawner cannot take go.
pub(crate) fn dead_letters(spawner: &Spawner) -> DeadLetters {
    DeadLetters::new(
        spawner.client.jetstream().clone(),
        spawner.subjects(),
        "cmd",
    )
}

/// Decodes a command and checks it with `validate`, recording its run id
/// on the current span first; a command that fails either is dead-lettered
/// with the reason, and `None` returned.
pub(crate) async fn accept<T: Message + Default>(
    spawner: &Spawner,
    message: jetstream::Message,
    validate: impl FnOnce(&T) -> Result<(), String>,
    run_id: impl FnOnce(&T) -> &str,
) -> Option<Delivery<T>> {
    let check = |command: &T| {
        tracing::Span::current().record("run_id", run_id(command));
        validate(command)
    };
    Delivery::decode(message, &dead_letters(spawner), check).await
}

/// Whether a command that failed for a transient reason may be tried again:
/// it was first published less than `claim_horizon_ms` ago. A tracker
/// restart, a database failover or a NATS blip is waited out, not turned
/// into a dead letter.
pub(crate) fn within_horizon<T>(spawner: &Spawner, command: &Delivery<T>) -> bool {
    command.published_within(Duration::from_millis(spawner.config.claim_horizon_ms))
}
