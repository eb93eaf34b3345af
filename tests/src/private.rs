//! Private servers: a PostgreSQL server and a NATS server of a test's own,
//! that the test may stop and start again (the shared servers serve the
//! parallel tests).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::random_suffix;

/// A PostgreSQL server of a test's own, on a free port, that the test may
/// stop and start (the shared server serves the parallel tests). Run as the
/// `postgres` user when the test runs as root, as the server requires.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.filter_map(|v| v.ok()).map(|v| v.path().join("bin")).max())
            .filter(|bin| bin.join("initdb").exists())
            .expect("PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin (Debian package postgresql)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("corral-pg-{}", random_suffix()));
        std::fs::create_dir_all(&dir).expect("data dir");
        let server = PrivatePostgres { dir, bin, port };
        if unsafe { libc::geteuid() } == 0 {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the data directory failed");
        }
        let data = server.dir.join("data");
        server.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        server.start_again();
        server
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("postgres tool runs");
        assert!(
            output.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts (again) and waits until it accepts connections.
    pub fn start_again(&self) {
        let data = self.dir.join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops it now (fast shutdown: connections are cut).
    pub fn stop(&self) {
        let data = self.dir.join("data");
        self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let program = self.bin.join("pg_ctl");
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let _ = command
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A NATS server (JetStream on, file storage) of a test's own, on a free
/// port, that the test may stop and start again with its streams intact.
pub struct PrivateNats {
    dir: PathBuf,
    pub port: u16,
    child: Option<std::process::Child>,
    /// A configuration file to start with (then the log goes to a file).
    config: Option<PathBuf>,
}

impl PrivateNats {
    pub fn start() -> PrivateNats {
        PrivateNats::start_with(None)
    }

    /// Starts with `conf` added to a configuration file that sets the
    /// port, JetStream and a log file ([`PrivateNats::log`]).
    pub fn start_with_config(conf: &str) -> PrivateNats {
        PrivateNats::start_with(Some(conf))
    }

    /// Starts with `conf` as [`PrivateNats::start_with_config`] does, or
    /// says why it could not: the server exited before it listened (a port
    /// of `conf` taken meanwhile by another test). The caller picks new
    /// ports and tries again.
    pub fn try_start_with_config(conf: &str) -> Result<PrivateNats, String> {
        PrivateNats::try_start_with(Some(conf))
    }

    fn start_with(conf: Option<&str>) -> PrivateNats {
        // A free port is free when picked, not necessarily when the server
        // binds it: tests running beside this one pick ports too. A server
        // that exits before it listens is started again on another port.
        let mut tries = Vec::new();
        for _ in 0..5 {
            match PrivateNats::try_start_with(conf) {
                Ok(server) => return server,
                Err(why) => tries.push(why),
            }
        }
        panic!("nats-server did not start: {}", tries.join("; "))
    }

    fn try_start_with(conf: Option<&str>) -> Result<PrivateNats, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("corral-nats-{}", random_suffix()));
        std::fs::create_dir_all(&dir).expect("nats store dir");
        let config = conf.map(|conf| {
            let path = dir.join("server.conf");
            let text = format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\nlog_file: \"{}\"\n{conf}\n",
                dir.join("store").display(),
                dir.join("nats.log").display()
            );
            std::fs::write(&path, text).expect("nats-server configuration");
            path
        });
        let mut server = PrivateNats {
            dir,
            port,
            child: None,
            config,
        };
        server.try_start_again().map(|()| server)
    }

    /// Its directory: configuration, store, log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the server logged (servers started with a configuration).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and store, and waits until it
    /// accepts connections.
    pub fn start_again(&mut self) {
        if let Err(why) = self.try_start_again() {
            panic!("{why}");
        }
    }

    fn try_start_again(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the NATS server is already running");
        let mut command = std::process::Command::new("nats-server");
        match &self.config {
            Some(config) => {
                command.arg("-c").arg(config);
            }
            None => {
                command
                    .args([
                        "-a",
                        "127.0.0.1",
                        "-p",
                        &self.port.to_string(),
                        "-js",
                        "-sd",
                    ])
                    .arg(self.dir.join("store"));
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (Debian package nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "nats-server exited ({status}) before it listened on {}: {}",
                    self.port,
                    self.log().lines().last().unwrap_or("(no log)")
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not listen on {} within 20 s",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops it now (SIGKILL: clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
