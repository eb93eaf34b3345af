//! Control groups of local sandboxes: the kernel's accounting of every
//! process a sandbox starts, detached or not. They carry the sandbox's
//! limits (memory, number of processes, CPU share), freeze and thaw it as
//! one, and name its members so that a kill misses none of them.
//!
//! cgroup v1 is used where its `memory` and `pids` controllers are mounted
//! (one directory per controller under `/sys/fs/cgroup/<controller>`); else
//! the unified v2 hierarchy, where freezing and killing need no controller
//! and limits apply when the controllers can be enabled. A sandbox's groups
//! are made under this process's own group of each hierarchy, named after
//! the sandbox, and their paths are recorded with the sandbox so that any
//! process on the node (a restarted spawner, the reaper) can act on them.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::procfs;

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "freezer", "cpu"];
const ROOT: &str = "/sys/fs/cgroup";

/// Where this node makes sandbox groups, found once at start.
#[derive(Clone, Debug)]
pub(crate) enum Cgroups {
    /// cgroup v1: the parent directory of each mounted controller.
    V1(Vec<(&'static str, PathBuf)>),
    /// cgroup v2: the parent directory in the unified hierarchy.
    V2(PathBuf),
    /// No usable hierarchy: rlimits are the only limits, and pause signals
    /// every process of the PID namespace instead of freezing a group.
    Unavailable(String),
}

/// Limits written into a sandbox's groups (0 = none).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU bandwidth in thousandths of a CPU.
    pub cpu_millis: u64,
}

/// One sandbox's groups, as recorded with it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SandboxGroups {
    /// 1 or 2 (0: none).
    pub version: u8,
    /// Every directory of the sandbox (one per v1 controller, one for v2).
    pub dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// Removes the empty groups of sandboxes that no longer exist (a kill
    /// that gave up waiting for a straggler to be reaped); `exists` tells
    /// whether a sandbox id is still on disk.
    pub fn collect(&self, exists: impl Fn(&str) -> bool) {
        let bases: Vec<&Path> = match self {
            Cgroups::V1(bases) => bases.iter().map(|(_, base)| base.as_path()).collect(),
            Cgroups::V2(base) => vec![base.as_path()],
            Cgroups::Unavailable(_) => return,
        };
        for base in bases {
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with("sbx-") && !exists(name) {
                    // Fails while members remain: tried again next time.
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    /// Looks at this process's own groups and what is mounted. Sandbox
    /// groups go in a group of their own per sandbox directory
    /// (`corral-<tag>`), so providers of different `CORRAL_HOME`s on one
    /// machine never touch each other's.
    pub fn detect(tag: &str) -> Cgroups {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut v1 = Vec::new();
        for controller in V1_CONTROLLERS {
            let mount = Path::new(ROOT).join(controller);
            let path = own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                names.split(',').any(|n| n == controller).then_some(path)
            });
            if let Some(path) = path
                && mount.join("cgroup.procs").exists()
            {
                let own = mount.join(path.trim_start_matches('/'));
                v1.push((controller, own.join(format!("corral-{tag}"))));
            }
        }
        let has = |name: &str| v1.iter().any(|(c, _)| *c == name);
        if has("memory") && has("pids") {
            return Cgroups::V1(v1);
        }
        let unified = Path::new(ROOT);
        if unified.join("cgroup.controllers").exists() {
            let path = own
                .lines()
                .find_map(|line| line.strip_prefix("0::"))
                .unwrap_or("/");
            let own = unified.join(path.trim_start_matches('/'));
            return Cgroups::V2(own.join(format!("corral-{tag}")));
        }
        Cgroups::Unavailable("no cgroup v1 memory and pids controllers, no cgroup v2".into())
    }

    /// Removes the (empty) parent groups of this sandbox directory's
    /// sandboxes: when the directory is given up (tests, uninstall).
    pub fn remove_parents(&self) {
        let bases: Vec<&Path> = match self {
            Cgroups::V1(bases) => bases.iter().map(|(_, base)| base.as_path()).collect(),
            Cgroups::V2(base) => vec![base.as_path()],
            Cgroups::Unavailable(_) => return,
        };
        for base in bases {
            let _ = std::fs::remove_dir(base);
        }
    }

    fn version_of(&self) -> u8 {
        match self {
            Cgroups::V1(_) => 1,
            Cgroups::V2(_) => 2,
            Cgroups::Unavailable(_) => 0,
        }
    }

    /// Makes the sandbox's groups and writes its limits. Undoes what it made
    /// when a step fails.
    pub fn create(&self, sandbox_id: &str, limits: Limits) -> io::Result<SandboxGroups> {
        let groups = match self {
            Cgroups::V1(bases) => SandboxGroups {
                version: 1,
                dirs: bases
                    .iter()
                    .map(|(_, base)| base.join(sandbox_id))
                    .collect(),
            },
            Cgroups::V2(base) => SandboxGroups {
                version: 2,
                dirs: vec![base.join(sandbox_id)],
            },
            Cgroups::Unavailable(_) => return Ok(SandboxGroups::default()),
        };
        let made = (|| {
            for dir in &groups.dirs {
                let parent = dir.parent().expect("a sandbox group has a parent");
                if !parent.exists() {
                    std::fs::create_dir_all(parent).map_err(|err| with_path(parent, err))?;
                    // v2: limits need the controllers enabled below the
                    // parent; freezing and killing work without them.
                    if self.version_of() == 2 {
                        let _ = std::fs::write(
                            parent.join("cgroup.subtree_control"),
                            "+memory +pids +cpu",
                        );
                    }
                }
                match std::fs::create_dir(dir) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(with_path(dir, err)),
                }
            }
            groups.write_limits(limits)
        })();
        if let Err(err) = made {
            groups.remove(Duration::ZERO);
            return Err(err);
        }
        Ok(groups)
    }
}

impl SandboxGroups {
    fn file(&self, name: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join(name))
            .find(|path| path.exists())
    }

    fn write_limits(&self, limits: Limits) -> io::Result<()> {
        let write = |name: &str, value: String| -> io::Result<()> {
            match self.file(name) {
                Some(path) => std::fs::write(&path, value).map_err(|err| with_path(&path, err)),
                None => Ok(()),
            }
        };
        if limits.memory_bytes > 0 {
            if self.version == 1 {
                write("memory.limit_in_bytes", limits.memory_bytes.to_string())?;
            } else {
                write("memory.max", limits.memory_bytes.to_string())?;
                write("memory.swap.max", "0".into())?;
            }
        }
        if limits.pids > 0 {
            write("pids.max", limits.pids.to_string())?;
        }
        if limits.cpu_millis > 0 {
            let period = 100_000u64;
            let quota = limits.cpu_millis * period / 1000;
            if self.version == 1 {
                write("cpu.cfs_period_us", period.to_string())?;
                write("cpu.cfs_quota_us", quota.to_string())?;
            } else {
                write("cpu.max", format!("{quota} {period}"))?;
            }
        }
        Ok(())
    }

    /// How often a fork failed at the sandbox's `pids` limit (`pids.events`
    /// "max"), if it has one.
    pub fn pids_limit_hits(&self) -> Option<u64> {
        let events = std::fs::read_to_string(self.file("pids.events")?).ok()?;
        events
            .lines()
            .find_map(|line| line.strip_prefix("max "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// Moves `pid` out of the sandbox's groups, back to their parents: for
    /// the host-side processes that start a sandbox and are not part of it
    /// (left unreaped after a crash, they would keep the groups busy).
    pub fn release(&self, pid: i32) {
        for dir in &self.dirs {
            if let Some(parent) = dir.parent() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid.to_string());
            }
        }
    }

    /// Moves `pid` into every group of the sandbox.
    pub fn admit(&self, pid: i32) -> io::Result<()> {
        for file in self.procs_files() {
            std::fs::write(&file, pid.to_string())
                .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", file.display())))?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes itself into to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// Every live process in the sandbox's groups (zombies aside: a dead
    /// process whose parent has not reaped it, e.g. a frozen spawner's
    /// `corral-enter`, runs nothing and cannot be killed again).
    pub fn members(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|pid| procfs::stat(*pid).is_some_and(|s| s.alive()));
        pids
    }

    /// Freezes (or thaws) every process of the sandbox and waits until the
    /// kernel reports it done. `Ok(false)`: no freezer to do it with.
    pub fn freeze(&self, frozen: bool) -> io::Result<bool> {
        if self.version == 1 {
            let Some(state) = self.file("freezer.state") else {
                return Ok(false);
            };
            let want = if frozen { "FROZEN" } else { "THAWED" };
            std::fs::write(&state, want).map_err(|err| with_path(&state, err))?;
            let done = procfs::wait_until(Duration::from_secs(5), || {
                std::fs::read_to_string(&state).is_ok_and(|s| s.trim() == want)
            });
            if !done {
                return Err(io::Error::other(format!(
                    "{} did not reach {want} within 5 s",
                    state.display()
                )));
            }
            return Ok(true);
        }
        let Some(freeze) = self.file("cgroup.freeze") else {
            return Ok(false);
        };
        std::fs::write(&freeze, if frozen { "1" } else { "0" })
            .map_err(|err| with_path(&freeze, err))?;
        let events = freeze.with_file_name("cgroup.events");
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        procfs::wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&events).is_ok_and(|s| s.lines().any(|l| l == want))
        });
        Ok(true)
    }

    /// SIGKILLs every member (thawing first, since a frozen v1 task dies
    /// only once thawed) until none is left or `limit` passed.
    pub fn kill_all(&self, limit: Duration) -> bool {
        if let Some(kill) = self.file("cgroup.kill") {
            let _ = std::fs::write(kill, "1");
        }
        let _ = self.freeze(false);
        procfs::wait_until(limit, || {
            let members = self.members();
            for pid in &members {
                procfs::signal(*pid, libc::SIGKILL);
            }
            members.is_empty()
        })
    }

    /// Removes the groups, waiting up to `limit` for the last members to be
    /// reaped (a group with members cannot be removed).
    pub fn remove(&self, limit: Duration) {
        // One deadline for all: a group kept busy by an unreaped straggler
        // must not cost `limit` per controller.
        let deadline = std::time::Instant::now() + limit;
        for dir in &self.dirs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            procfs::wait_until(left, || match std::fs::remove_dir(dir) {
                Ok(()) => true,
                Err(err) => err.kind() == io::ErrorKind::NotFound,
            });
        }
    }
}

/// Whether the process is frozen by its control group's freezer (v1
/// `freezer.state` FROZEN, v2 `cgroup.events` "frozen 1").
pub(crate) fn frozen(pid: i32) -> bool {
    let Ok(own) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    own.lines().any(|line| {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(names), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let path = path.trim_start_matches('/');
        if names.split(',').any(|n| n == "freezer") {
            let state = Path::new(ROOT)
                .join("freezer")
                .join(path)
                .join("freezer.state");
            return std::fs::read_to_string(state).is_ok_and(|s| s.trim() == "FROZEN");
        }
        if names.is_empty() {
            return [Path::new(ROOT).to_owned(), Path::new(ROOT).join("unified")]
                .iter()
                .any(|root| {
                    std::fs::read_to_string(root.join(path).join("cgroup.events"))
                        .is_ok_and(|s| s.lines().any(|l| l == "frozen 1"))
                });
        }
        false
    })
}

fn with_path(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}
