//! A cancellation token cancelled by SIGINT or SIGTERM; a second signal exits
//! at once (redelivery makes a hard stop safe, a graceful one avoids it).

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT/SIGTERM. On a second signal
/// the process exits with status 130.
pub fn signal_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested, finishing work in hand (signal again to force)");
        cancel.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal, exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be killed; never cancel.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
