//! What the local provider reads from `/proc`: a process's state, group and
//! start time, its PID namespace, its children. Nothing here trusts anything
//! a sandboxed process can write: `/proc/<pid>/stat` and the namespace links
//! are the kernel's.

use std::time::{Duration, Instant};

/// A process's state letter, process group and start time (clock ticks
/// since boot), from `/proc/<pid>/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
}

impl Stat {
    pub fn alive(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

pub(crate) fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start
    // after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The inode of the process's PID namespace (`/proc/<pid>/ns/pid`).
pub(crate) fn pid_namespace(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// Every pid in /proc.
pub(crate) fn pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Live processes whose PID namespace is `namespace`.
pub(crate) fn in_namespace(namespace: u64) -> Vec<i32> {
    pids()
        .into_iter()
        .filter(|pid| pid_namespace(*pid) == Some(namespace))
        .filter(|pid| stat(*pid).is_some_and(|s| s.alive()))
        .collect()
}

/// Live processes of the process group `pgid`.
pub(crate) fn in_group(pgid: i32) -> Vec<i32> {
    pids()
        .into_iter()
        .filter(|pid| stat(*pid).is_some_and(|s| s.alive() && s.pgrp == pgid))
        .collect()
}

/// The direct children of `pid` (`/proc/<pid>/task/<pid>/children`).
pub(crate) fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` runs `sleep` (a sandbox init's PID 2 once set up).
pub(crate) fn is_init_sleep(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| raw.starts_with(b"sleep\0"))
}

/// Whether `pid` is alive with the recorded start time (not a later process
/// that reused the number).
pub(crate) fn is_same_process(pid: i32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| s.alive() && s.start_time == start_time)
}

pub(crate) fn signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}

pub(crate) fn killpg(pgid: i32, signal: i32) -> bool {
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe { libc::killpg(pgid, signal) == 0 }
}

/// Polls `done` every 2 ms until it holds or `limit` passed; returns
/// whether it held.
pub(crate) fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The process's pid in its own PID namespace (the last of `NSpid`).
pub(crate) fn ns_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read_from_proc() {
        let me = std::process::id() as i32;
        let stat = stat(me).expect("own stat");
        assert!(stat.alive());
        assert!(is_same_process(me, stat.start_time));
        assert!(!is_same_process(me, stat.start_time + 1));
        let ns = pid_namespace(me).expect("own pid namespace");
        assert!(in_namespace(ns).contains(&me));
    }
}
