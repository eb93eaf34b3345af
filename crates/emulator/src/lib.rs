//! Emulators of the E2B and Daytona APIs for tests: axum servers on
//! 127.0.0.1 whose sandboxes are real process groups of a
//! [`corral_provider::LocalProvider`] rooted at a home directory the test
//! passes. Creates, execs, pauses (SIGSTOP), resumes (SIGCONT) and kills do
//! what they say to real processes; each sandbox expires like the real
//! service's; and [`Faults`] make the next requests fail, slow down or lose
//! their response, so the providers' retries can be tested.
//!
//! They speak the subset of each API that `corral_provider`'s
//! [`E2bProvider`](corral_provider::E2bProvider) and
//! [`DaytonaProvider`](corral_provider::DaytonaProvider) use. Each test
//! starts its own emulator; dropping it stops the server and kills what its
//! sandboxes still run.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::task::JoinHandle;

pub mod daytona;
pub mod e2b;
mod faults;
pub mod record;
mod sandboxes;

pub use daytona::DaytonaEmulator;
pub use e2b::E2bEmulator;
pub use faults::Faults;
pub use record::{Exchange, Recorder};

/// A server on a free port of 127.0.0.1, stopped when dropped; what passes
/// through it can be recorded ([`Recorder`]).
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
    recorder: Arc<Recorder>,
}

impl Server {
    async fn start(router: Router) -> std::io::Result<Server> {
        let recorder = Arc::new(Recorder::default());
        let router = router.layer(axum::middleware::from_fn_with_state(
            recorder.clone(),
            record::tap,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, router).await {
                tracing::warn!(error = %err, "emulator server failed");
            }
        });
        Ok(Server {
            addr,
            task,
            recorder,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
