//! The command lines that put a local sandbox in its own namespaces.
//!
//! A sandbox is one bubblewrap process tree made at create: PID, mount, IPC
//! and UTS namespaces (and a network namespace when the run asks for none),
//! the host's system directories read-only, the sandbox's work directory at
//! [`SANDBOX_WORK`], a private `/tmp`, its own `/proc`, every capability
//! dropped. Its PID 1 (bubblewrap's reaper, with `sleep infinity` under it)
//! lives until the sandbox is killed; killing that PID 1 makes the kernel
//! kill every process of the namespace, however it detached.
//!
//! Each command then starts through `corral-enter` (this crate's helper
//! binary), which joins the sandbox's control groups, enters those
//! namespaces, starts a session of its own, sets the rlimits and drops to
//! the agent user without capabilities and without a way to gain
//! privileges, all before anything of the agent runs, so nothing it forks
//! escapes. The init (bubblewrap) is moved into the groups before it is
//! given its options on stdin, so it too forks nothing outside them.
//!
//! Why bubblewrap: it is the isolation layer of Flatpak and of several agent
//! CLIs' sandboxes, a small audited C program packaged everywhere; it sets
//! up the mounts in the right order (read-only binds, a read-only root,
//! `/proc/sys` read-only) which by hand is easy to get subtly wrong. The
//! persistent namespace (rather than one bubblewrap per command) is what
//! lets a kept sandbox's background processes and `/tmp` outlive a turn.

use std::ffi::OsString;
use std::path::Path;

use super::config::{Bind, Network};

/// Where the work directory appears inside a sandbox (its `HOME` and cwd).
pub const SANDBOX_WORK: &str = "/work";

/// The programs isolation needs, looked up in `PATH` at start (the
/// helper, `corral-enter`, is looked up beside this program first).
pub(crate) const TOOLS: [&str; 1] = ["bwrap"];

/// The helper's name: a binary of this crate, installed beside the
/// spawner's.
pub(crate) const ENTER: &str = "corral-enter";

/// What the init of a sandbox is made with.
pub(crate) struct InitSpec<'a> {
    pub sandbox_id: &'a str,
    pub work: &'a Path,
    pub binds: &'a [Bind],
    pub network: Network,
    pub tmp_size_mib: u64,
    pub as_root: bool,
}

/// The helper's arguments that join the control groups (`procs`: their
/// `cgroup.procs` files) before it execs what follows.
pub(crate) fn join(procs: &[std::path::PathBuf]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    for file in procs {
        argv.extend(["--join".into(), file.as_os_str().to_owned()]);
    }
    argv
}

/// The host's system directories, read-only: `/usr`, `/etc`, and `/bin`,
/// `/lib`... as the symlinks (merged `/usr`) or directories they are here.
pub(crate) fn system() -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    for dir in ["/usr", "/etc"] {
        args.extend(["--ro-bind".into(), dir.into(), dir.into()]);
    }
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        match std::fs::read_link(top) {
            Ok(target) => args.extend(["--symlink".into(), target.into(), top.into()]),
            Err(_) if Path::new(top).is_dir() => {
                args.extend(["--ro-bind".into(), top.into(), top.into()])
            }
            Err(_) => {}
        }
    }
    args
}

/// bubblewrap's arguments for the init: its options come on its stdin
/// ([`init_args`]), so the host paths never show in the command line an
/// agent can read as `/proc/1/cmdline`; PID 2 sleeps until the sandbox is
/// killed.
pub(crate) const INIT_ARGS: [&str; 5] = ["--args", "0", "--", "sleep", "infinity"];

/// The ancestors of a bind's sandbox path that bubblewrap would create
/// (not `/`, nor under the system, work, `/tmp`, `/proc` or `/dev` mounts),
/// outermost first.
fn made_on_the_way(sandbox: &Path) -> Vec<std::path::PathBuf> {
    const MOUNTED: [&str; 12] = [
        "/usr",
        "/etc",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/proc",
        "/dev",
        "/tmp",
        SANDBOX_WORK,
    ];
    let mut dirs: Vec<std::path::PathBuf> = sandbox
        .ancestors()
        .skip(1)
        .filter(|dir| dir.parent().is_some())
        .take_while(|dir| !MOUNTED.iter().any(|m| dir.starts_with(m)))
        .map(Path::to_path_buf)
        .collect();
    dirs.reverse();
    dirs
}

/// bubblewrap's options for a sandbox's init, NUL-separated.
pub(crate) fn init_args(spec: &InitSpec) -> Vec<u8> {
    let mut args: Vec<OsString> = vec![
        "--unshare-pid".into(),
        "--unshare-ipc".into(),
        "--unshare-uts".into(),
        "--hostname".into(),
        spec.sandbox_id.into(),
        "--new-session".into(),
    ];
    if spec.network == Network::None {
        args.push("--unshare-net".into());
    }
    if spec.as_root {
        args.extend(["--cap-drop".into(), "ALL".into()]);
    }
    args.extend(system());
    let tmp_size = spec.tmp_size_mib.max(1) * 1024 * 1024;
    args.extend([
        "--proc".into(),
        "/proc".into(),
        "--dev".into(),
        "/dev".into(),
        "--perms".into(),
        "1777".into(),
        "--size".into(),
        tmp_size.to_string().into(),
        "--tmpfs".into(),
        "/tmp".into(),
        "--bind".into(),
        spec.work.into(),
        SANDBOX_WORK.into(),
    ]);
    for bind in spec.binds {
        // Directories bubblewrap makes on the way to a bind are private
        // (0700) unless told otherwise: the agent (not root) could not
        // reach the bind. Those outside the system and work directories
        // are made 0755.
        for dir in made_on_the_way(&bind.sandbox) {
            args.extend(["--perms".into(), "0755".into(), "--dir".into(), dir.into()]);
        }
        let how = if bind.writable { "--bind" } else { "--ro-bind" };
        args.extend([
            how.into(),
            bind.host.clone().into(),
            bind.sandbox.clone().into(),
        ]);
    }
    args.extend([
        "--remount-ro".into(),
        "/".into(),
        "--chdir".into(),
        SANDBOX_WORK.into(),
        "--info-fd".into(),
        "1".into(),
    ]);
    let mut bytes = Vec::new();
    for arg in args {
        use std::os::unix::ffi::OsStrExt;
        bytes.extend_from_slice(arg.as_bytes());
        bytes.push(0);
    }
    bytes
}

/// What a command is started with inside a sandbox, after [`join`].
pub(crate) struct EnterSpec<'a> {
    pub init_pid: i32,
    pub network: Network,
    /// `Some((uid, gid))`: switch to that user (the spawner runs as root).
    pub user: Option<(u32, u32)>,
    /// `--rlimit` values ([`rlimits`]).
    pub rlimits: &'a [String],
    pub argv: &'a [String],
}

/// The helper's arguments that enter the sandbox of `spec.init_pid` and
/// exec `spec.argv` there as the agent user.
pub(crate) fn enter(spec: &EnterSpec) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec!["--target".into(), spec.init_pid.to_string().into()];
    if spec.network == Network::None {
        argv.push("--net".into());
    }
    if let Some((uid, gid)) = spec.user {
        argv.extend(["--user".into(), format!("{uid}:{gid}").into()]);
    }
    for limit in spec.rlimits {
        argv.extend(["--rlimit".into(), limit.into()]);
    }
    argv.push("--".into());
    argv.extend(spec.argv.iter().map(OsString::from));
    argv
}

/// `--rlimit` values: address space per process, CPU seconds (SIGXCPU at
/// the soft limit, SIGKILL 5 s later), largest file, no core files.
pub(crate) fn rlimits(memory_mib: u64, cpu_secs: u64, file_size_mib: u64) -> Vec<String> {
    let mut limits = vec!["core=0".to_owned()];
    if memory_mib > 0 {
        limits.push(format!("as={}", memory_mib.saturating_mul(1 << 20)));
    }
    if cpu_secs > 0 {
        limits.push(format!("cpu={cpu_secs}:{}", cpu_secs + 5));
    }
    if file_size_mib > 0 {
        limits.push(format!("fsize={}", file_size_mib.saturating_mul(1 << 20)));
    }
    limits
}

/// Whether `program` is found in `PATH`.
pub(crate) fn on_path(program: &str, path: &str) -> bool {
    path.split(':')
        .filter(|d| !d.is_empty())
        .any(|dir| executable(&Path::new(dir).join(program)))
}

pub(crate) fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_made_for_a_bind_are_those_outside_the_mounts() {
        let made = made_on_the_way(Path::new("/opt/corral/bin/corral"));
        assert_eq!(
            made,
            ["/opt", "/opt/corral", "/opt/corral/bin"].map(std::path::PathBuf::from)
        );
        assert!(made_on_the_way(Path::new("/usr/local/bin/tool")).is_empty());
        assert!(made_on_the_way(Path::new("/work/cache")).is_empty());
        assert!(made_on_the_way(Path::new("/shared")).is_empty());
    }
}
