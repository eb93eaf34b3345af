//! The open-file limit a service needs, raised at start.
//!
//! A spawner holds a few descriptors for every sandbox it owns (the agent's
//! output pipes, pidfds of the processes it waits for). Most systems start
//! services with a soft limit of 1024 open files and a much higher hard
//! limit; at 1024 a spawner ran out at about 250 sandboxes, its runs failed
//! with "Too many open files" and so did the kills of their sandboxes. So a
//! service raises its soft limit to the hard one, as the Go runtime does,
//! and a spawner takes no more runs than the limit leaves room for.

/// The ceiling used when the hard limit is unlimited (the kernel refuses a
/// soft limit above `fs.nr_open`, 1048576 by default).
const UNLIMITED_CEILING: u64 = 1 << 20;

/// Raises this process's soft limit on open files to its hard limit.
/// Returns the soft limit now in force, or `None` if it cannot be read.
pub fn raise_open_files() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let hard = if limit.rlim_max == libc::RLIM_INFINITY {
        UNLIMITED_CEILING
    } else {
        limit.rlim_max
    };
    if limit.rlim_cur < hard {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(hard);
        }
    }
    Some(limit.rlim_cur)
}

/// How many runs fit in `open_files` descriptors when each needs
/// `per_run` and the service keeps `spare` for itself; `wanted` at most,
/// one at least.
pub fn runs_within(open_files: u64, per_run: u64, spare: u64, wanted: usize) -> usize {
    let room = open_files.saturating_sub(spare) / per_run.max(1);
    (room.min(wanted as u64) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_fit_in_what_the_limit_leaves_after_the_spare() {
        assert_eq!(runs_within(1024, 6, 64, 1024), 160);
        assert_eq!(
            runs_within(20_000, 6, 64, 1024),
            1024,
            "the wanted number fits"
        );
        assert_eq!(runs_within(10, 6, 64, 1024), 1, "one run at least");
        assert_eq!(runs_within(1024, 0, 64, 5), 5, "no divide by zero");
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_and_never_lowered() {
        let mut before = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) },
            0
        );
        let now = raise_open_files().expect("the limit is readable");
        assert!(now >= before.rlim_cur, "{now} < {}", before.rlim_cur);
        let mut after = before;
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut after) },
            0
        );
        assert_eq!(
            after.rlim_cur, now,
            "the limit reported is the one in force"
        );
        if before.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(now, before.rlim_max, "raised to the hard limit");
        }
    }
}
