//! `corral-enter`: starts one command of an isolated local sandbox.
//!
//! The local provider runs every command of an isolated sandbox through
//! this small program, one exec where the shell, `nsenter`, `setsid`,
//! `prlimit` and `setpriv` used to be five (they were a quarter of the
//! machine's CPU time at 60 runs/s). In order, before anything of the
//! command runs:
//!
//! 1. joins the sandbox's control groups (`--join FILE`, each a
//!    `cgroup.procs`), so what it forks is accounted from the start;
//! 2. with `--target PID`: enters the IPC, UTS, (with `--net`) network, PID
//!    and mount namespaces of the sandbox's PID 1 and takes its root and
//!    working directory, then forks (a PID namespace applies to children)
//!    and waits outside the sandbox, ending as its child ended;
//! 3. in the child: a session and process group of its own, the rlimits
//!    (`--rlimit core=0`, `as=BYTES`, `cpu=SOFT:HARD`, `fsize=BYTES`), an
//!    empty capability bounding set and no inheritable or ambient
//!    capabilities, the agent user (`--user UID:GID`, no supplementary
//!    groups), no way to gain privileges (`no_new_privs`);
//! 4. execs the command, looked up in the `PATH` of its environment.
//!
//! Without `--target` it only joins the groups and execs: the sandbox's init
//! (bubblewrap) starts that way. Any step that fails ends it with status 125
//! and a line on stderr naming the step; a command that cannot be executed
//! ends it with 126 (127: not found), as `env` and `nsenter` do.
//!
//! It runs as root (the spawner does), single-threaded, and is not meant to
//! be started by hand.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::process::exit;

/// Status of a failed step before the command ran.
const FAILED: i32 = 125;

struct Args {
    join: Vec<OsString>,
    target: Option<i32>,
    net: bool,
    user: Option<(u32, u32)>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlim_t, libc::rlim_t)>,
    argv: Vec<CString>,
}

fn main() {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(why) => fail(&why),
    };
    for file in &args.join {
        let pid = std::process::id().to_string();
        if let Err(err) = std::fs::write(file, pid) {
            fail(&format!("joining {}: {err}", file.to_string_lossy()));
        }
    }
    if let Some(target) = args.target {
        enter(target, args.net);
        // SAFETY: single-threaded; the child only makes syscalls and execs.
        match unsafe { libc::fork() } {
            -1 => fail(&format!("fork: {}", std::io::Error::last_os_error())),
            0 => {}
            child => wait_as(child),
        }
        // SAFETY: setsid has no preconditions; the child is not a group leader.
        if unsafe { libc::setsid() } < 0 {
            fail(&format!("setsid: {}", std::io::Error::last_os_error()));
        }
    }
    for (resource, soft, hard) in &args.rlimits {
        let limit = libc::rlimit {
            rlim_cur: *soft,
            rlim_max: *hard,
        };
        // SAFETY: setrlimit reads `limit` only.
        if unsafe { libc::setrlimit(*resource, &limit) } != 0 {
            fail(&format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    if args.target.is_some() {
        drop_privileges(args.user);
    }
    exec(&args.argv);
}

fn fail(why: &str) -> ! {
    eprintln!("corral-enter: {why}");
    exit(FAILED)
}

fn parse(mut raw: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let mut args = Args {
        join: Vec::new(),
        target: None,
        net: false,
        user: None,
        rlimits: Vec::new(),
        argv: Vec::new(),
    };
    let value = |raw: &mut dyn Iterator<Item = OsString>, flag: &str| {
        raw.next()
            .ok_or_else(|| format!("{flag} needs a value"))
            .map(|v| v.to_string_lossy().into_owned())
    };
    while let Some(arg) = raw.next() {
        match arg.to_str() {
            Some("--join") => args.join.push(raw.next().ok_or("--join needs a file")?),
            Some("--target") => {
                let pid = value(&mut raw, "--target")?;
                args.target = Some(pid.parse().map_err(|_| format!("--target {pid:?}"))?);
            }
            Some("--net") => args.net = true,
            Some("--user") => {
                let user = value(&mut raw, "--user")?;
                let parsed = user
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
                args.user = Some(parsed.ok_or_else(|| format!("--user {user:?}: UID:GID"))?);
            }
            Some("--rlimit") => {
                let limit = value(&mut raw, "--rlimit")?;
                args.rlimits
                    .push(rlimit(&limit).ok_or_else(|| format!("--rlimit {limit:?}"))?);
            }
            Some("--") => {
                for arg in raw.by_ref() {
                    let arg = CString::new(arg.into_vec())
                        .map_err(|_| "an argument holds a NUL byte".to_owned())?;
                    args.argv.push(arg);
                }
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if args.argv.is_empty() {
        return Err("no command after --".into());
    }
    Ok(args)
}

/// `NAME=SOFT[:HARD]`.
fn rlimit(spec: &str) -> Option<(libc::__rlimit_resource_t, libc::rlim_t, libc::rlim_t)> {
    let (name, values) = spec.split_once('=')?;
    let resource = match name {
        "core" => libc::RLIMIT_CORE,
        "as" => libc::RLIMIT_AS,
        "cpu" => libc::RLIMIT_CPU,
        "fsize" => libc::RLIMIT_FSIZE,
        _ => return None,
    };
    let (soft, hard) = match values.split_once(':') {
        Some((soft, hard)) => (soft.parse().ok()?, hard.parse().ok()?),
        None => {
            let both = values.parse().ok()?;
            (both, both)
        }
    };
    Some((resource, soft, hard))
}

fn open(path: &str) -> OwnedFd {
    match std::fs::File::open(path) {
        Ok(file) => file.into(),
        Err(err) => fail(&format!("{path}: {err}")),
    }
}

/// Enters the namespaces of `target` and takes its root and working
/// directory (everything is opened first: the mount namespace changes what
/// `/proc` shows).
fn enter(target: i32, net: bool) {
    let mut kinds = vec![
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("pid", libc::CLONE_NEWPID),
        ("mnt", libc::CLONE_NEWNS),
    ];
    if net {
        kinds.insert(2, ("net", libc::CLONE_NEWNET));
    }
    let namespaces: Vec<(&str, i32, OwnedFd)> = kinds
        .into_iter()
        .map(|(name, kind)| (name, kind, open(&format!("/proc/{target}/ns/{name}"))))
        .collect();
    let root = open(&format!("/proc/{target}/root"));
    let cwd = open(&format!("/proc/{target}/cwd"));
    for (name, kind, fd) in &namespaces {
        // SAFETY: fd is an open namespace file of the kind named.
        if unsafe { libc::setns(fd.as_raw_fd(), *kind) } != 0 {
            fail(&format!(
                "setns {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: root is an open directory; chroot takes a NUL-terminated path.
    let rooted = unsafe { libc::fchdir(root.as_raw_fd()) == 0 && libc::chroot(c".".as_ptr()) == 0 };
    // SAFETY: cwd is an open directory.
    if !rooted || unsafe { libc::fchdir(cwd.as_raw_fd()) } != 0 {
        fail(&format!(
            "taking the sandbox's root: {}",
            std::io::Error::last_os_error()
        ));
    }
}

/// Waits for the command and ends as it did: its exit status, or killed
/// by the same signal.
fn wait_as(child: i32) -> ! {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        if unsafe { libc::waitpid(child, &mut status, 0) } == child {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            fail(&format!("waitpid: {}", std::io::Error::last_os_error()));
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: resetting a disposition and raising a signal at oneself.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
        }
        exit(128 + signal);
    }
    exit(libc::WEXITSTATUS(status))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the capability bounding set, the inheritable and ambient sets,
/// becomes `user` (whose permitted and effective sets the kernel then
/// clears) and sets `no_new_privs`.
fn drop_privileges(user: Option<(u32, u32)>) {
    let last = |what: &str| fail(&format!("{what}: {}", std::io::Error::last_os_error()));
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            last("dropping the capability bounding set");
        }
    }
    // SAFETY: prctl with integer arguments.
    let ambient = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if ambient != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        last("clearing ambient capabilities");
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and two data structs, as version 3 requires.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        last("capget");
    }
    for set in &mut data {
        set.inheritable = 0;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        last("clearing inheritable capabilities");
    }
    if let Some((uid, gid)) = user {
        // SAFETY: plain syscalls with integer arguments.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                last("setgroups");
            }
            if libc::setresgid(gid, gid, gid) != 0 {
                last("setresgid");
            }
            if libc::setresuid(uid, uid, uid) != 0 {
                last("setresuid");
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        last("no_new_privs");
    }
}

fn exec(argv: &[CString]) -> ! {
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings
    // that outlive the call.
    unsafe { libc::execvp(pointers[0], pointers.as_ptr()) };
    let err = std::io::Error::last_os_error();
    eprintln!(
        "corral-enter: cannot execute {}: {err}",
        argv[0].to_string_lossy()
    );
    exit(if err.raw_os_error() == Some(libc::ENOENT) {
        127
    } else {
        126
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse(list.iter().map(OsString::from))
    }

    #[test]
    fn the_arguments_the_provider_gives_are_understood() {
        let parsed = args(&[
            "--join",
            "/sys/fs/cgroup/pids/x/cgroup.procs",
            "--target",
            "42",
            "--net",
            "--user",
            "65534:65534",
            "--rlimit",
            "core=0",
            "--rlimit",
            "cpu=60:65",
            "--",
            "sh",
            "-c",
            "echo --target",
        ])
        .expect("parsed");
        assert_eq!(parsed.join.len(), 1);
        assert_eq!(parsed.target, Some(42));
        assert!(parsed.net);
        assert_eq!(parsed.user, Some((65534, 65534)));
        assert_eq!(
            parsed.rlimits,
            [(libc::RLIMIT_CORE, 0, 0), (libc::RLIMIT_CPU, 60, 65)]
        );
        let argv: Vec<_> = parsed
            .argv
            .iter()
            .map(|a| a.to_str().expect("utf-8"))
            .collect();
        assert_eq!(argv, ["sh", "-c", "echo --target"]);
    }

    #[test]
    fn a_bad_argument_is_named() {
        let err = |list: &[&str]| args(list).err().expect("refused");
        assert!(err(&["--target", "x", "--", "true"]).contains("--target \"x\""));
        assert!(err(&["--user", "1", "--", "true"]).contains("UID:GID"));
        assert!(err(&["--rlimit", "nofile=1", "--", "true"]).contains("nofile"));
        assert!(err(&["--frobnicate"]).contains("unknown argument"));
        assert!(err(&["--join", "/x"]).contains("no command"));
    }
}
