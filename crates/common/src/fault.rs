//! Fault points: places where a test can make a service process die, as a
//! crash would, at an exact step (between a commit and its announcement,
//! say). Compiled into debug builds only — what the tests run; a release
//! build has none and ignores the variable.
//!
//! `CORRAL_FAULT_POINT=<name>[:<n>]` SIGKILLs the process the `n`th time
//! (default the first) it reaches [`point`] with that name.

/// Dies here if `CORRAL_FAULT_POINT` names this point (debug builds only).
#[inline]
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    armed::reach(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

#[cfg(debug_assertions)]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Armed {
        name: String,
        at: u64,
        reached: AtomicU64,
    }

    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let spec = std::env::var("CORRAL_FAULT_POINT").ok()?;
                let (name, at) = match spec.split_once(':') {
                    Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                    None => (spec, 1),
                };
                Some(Armed {
                    name,
                    at,
                    reached: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub fn reach(name: &str) {
        let Some(armed) = armed() else { return };
        if armed.name != name {
            return;
        }
        if armed.reached.fetch_add(1, Ordering::SeqCst) + 1 == armed.at {
            eprintln!("fault point {name} reached: SIGKILL");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}
