//! The local provider's settings (`local:` in the spawner's and reaper's
//! configuration, `CORRAL_LOCAL__*` in the environment).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ProviderError;

/// How local sandboxes are separated from the machine and each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Each sandbox in its own PID, mount, IPC and UTS namespaces
    /// (bubblewrap), its processes in its own control groups, the agent an
    /// unprivileged user without capabilities. Killing the sandbox kills
    /// everything in it.
    #[default]
    Namespaces,
    /// Plain process groups: the agent sees this machine, the control
    /// plane's processes included. Only for machines that cannot create
    /// namespaces, by an operator who accepts that risk; every sandbox logs
    /// a warning.
    None,
}

/// A sandbox's network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The machine's network: agents reach package registries and event
    /// ingest, and anything else this machine reaches.
    #[default]
    Host,
    /// A network namespace with only loopback: nothing outside the sandbox
    /// is reachable (agents cannot post events over HTTP either).
    None,
}

impl Network {
    /// `""` (the provider's default), `host` or `none`.
    pub fn parse(text: &str) -> Result<Option<Network>, String> {
        match text {
            "" => Ok(None),
            "host" => Ok(Some(Network::Host)),
            "none" => Ok(Some(Network::None)),
            other => Err(format!("unknown network {other:?}: use host or none")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// `namespaces` (default) or `none`. With `namespaces` a spawner that
    /// cannot create them refuses to start; `none` accepts explicitly that
    /// agents see this machine.
    pub isolation: Isolation,
    /// Default network of sandboxes: `host` (default) or `none`; a run may
    /// ask for `none` (`RunSpec.network`).
    pub network: Network,
    /// This node's id: the `corral.node` label of its sandboxes and part of
    /// their ids ("" = the host name). Only this node lists, probes and kills
    /// them; give every machine (and every `CORRAL_HOME`) its own.
    pub node: String,
    /// Host paths visible in every sandbox: `HOST[:SANDBOX_PATH][:ro|rw]`,
    /// read-only unless `rw` (e.g. an agent's binary, a package cache).
    pub binds: Vec<String>,
    /// Processes and threads a sandbox may have at once (0 = no limit).
    pub pids_max: u64,
    /// CPUs a sandbox may use at once, in thousandths (1000 = one CPU;
    /// 0 = no limit).
    pub cpu_millis: u64,
    /// Largest file a sandbox process may write, MiB (0 = no limit).
    pub file_size_mib: u64,
    /// Size of the sandbox's private `/tmp` (memory-backed), MiB.
    pub tmp_size_mib: u64,
    /// User and group the agent runs as when the spawner runs as root.
    pub agent_uid: u32,
    pub agent_gid: u32,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            isolation: Isolation::Namespaces,
            network: Network::Host,
            node: String::new(),
            binds: Vec::new(),
            pids_max: 1024,
            cpu_millis: 1000,
            file_size_mib: 4096,
            tmp_size_mib: 512,
            agent_uid: 65534,
            agent_gid: 65534,
        }
    }
}

impl LocalConfig {
    /// Plain process groups, no namespaces: for the API emulators, whose
    /// sandboxes stand in for remote machines.
    pub fn unisolated() -> LocalConfig {
        LocalConfig {
            isolation: Isolation::None,
            ..LocalConfig::default()
        }
    }

    /// `node`, or this machine's host name, reduced to `[A-Za-z0-9_-]`.
    pub fn node_id(&self) -> String {
        let raw = if self.node.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default()
        } else {
            self.node.clone()
        };
        let cleaned: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(48)
            .collect();
        if cleaned.is_empty() {
            "node".into()
        } else {
            cleaned
        }
    }

    pub(crate) fn parsed_binds(&self) -> Result<Vec<Bind>, ProviderError> {
        self.binds.iter().map(|text| Bind::parse(text)).collect()
    }
}

/// A host path made visible in sandboxes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bind {
    pub host: PathBuf,
    pub sandbox: PathBuf,
    pub writable: bool,
}

impl Bind {
    fn parse(text: &str) -> Result<Bind, ProviderError> {
        let bad = |why: &str| {
            ProviderError::Invalid(format!(
                "local.binds entry {text:?}: {why} (use HOST[:SANDBOX_PATH][:ro|rw])"
            ))
        };
        let mut parts: Vec<&str> = text.split(':').collect();
        let writable = match parts.last() {
            Some(&"rw") if parts.len() > 1 => {
                parts.pop();
                true
            }
            Some(&"ro") if parts.len() > 1 => {
                parts.pop();
                false
            }
            _ => false,
        };
        let (host, sandbox) = match parts.as_slice() {
            [host] => (*host, *host),
            [host, sandbox] => (*host, *sandbox),
            _ => return Err(bad("too many ':'")),
        };
        if !host.starts_with('/') || !sandbox.starts_with('/') {
            return Err(bad("paths must be absolute"));
        }
        Ok(Bind {
            host: host.into(),
            sandbox: sandbox.into(),
            writable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse_with_an_optional_target_and_mode() {
        let config = LocalConfig {
            binds: vec![
                "/opt/agent".into(),
                "/srv/cache:/cache:rw".into(),
                "/a:ro".into(),
            ],
            ..Default::default()
        };
        let binds = config.parsed_binds().expect("valid");
        assert_eq!(binds[0].sandbox, PathBuf::from("/opt/agent"));
        assert!(!binds[0].writable);
        assert_eq!(binds[1].sandbox, PathBuf::from("/cache"));
        assert!(binds[1].writable);
        assert_eq!(binds[2].host, PathBuf::from("/a"));
        let err = LocalConfig {
            binds: vec!["relative:/x".into()],
            ..Default::default()
        }
        .parsed_binds()
        .expect_err("relative path");
        assert!(err.to_string().contains("local.binds"), "{err}");
    }

    #[test]
    fn node_ids_are_safe_subject_tokens() {
        let config = LocalConfig {
            node: "host.example:1".into(),
            ..Default::default()
        };
        assert_eq!(config.node_id(), "host-example-1");
        assert!(!LocalConfig::default().node_id().is_empty());
    }
}
