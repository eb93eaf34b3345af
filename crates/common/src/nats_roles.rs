//! Least-privilege NATS users: what each party of a deployment may publish
//! and subscribe, and the server configuration that says so.
//!
//! Each role gets an nkey user (the server holds only the public key) and
//! its own reply inbox (`_INBOX_<role>`), so no party reads another's
//! replies. Services answer requests through `allow_responses`, not a
//! publish right on inboxes. Agents get no NATS access at all: they post
//! events over HTTP with their run token.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use corral_proto::Subjects;

/// A party of a deployment, as NATS sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Tracker,
    Spawner,
    Reaper,
    Ingest,
    /// Publishes commands, reads lifecycle, events and dead letters (the
    /// platform that drives corral, `corral` CLI users).
    Platform,
    /// Reads lifecycle and events through its own durable consumers.
    Analytics,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Tracker,
        Role::Spawner,
        Role::Reaper,
        Role::Ingest,
        Role::Platform,
        Role::Analytics,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Tracker => "tracker",
            Role::Spawner => "spawner",
            Role::Reaper => "reaper",
            Role::Ingest => "ingest",
            Role::Platform => "platform",
            Role::Analytics => "analytics",
        }
    }

    /// The reply inbox prefix this role connects with.
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }
}

/// What a role may do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer the requests it receives (and only those).
    pub allow_responses: bool,
}

/// The JetStream API a consumer of `stream` named `consumer` (`*`: any
/// name, e.g. ordered consumers) needs: create it, read its info, pull,
/// acknowledge, and delete what it created.
fn consume(publish: &mut Vec<String>, stream: &str, consumer: &str) {
    publish.extend([
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>"),
        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        format!("$JS.ACK.{stream}.{consumer}.>"),
    ]);
    if consumer == "*" {
        // Ordered consumers: an unnamed create, and a delete on recreate.
        publish.extend([
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
        ]);
    }
}

/// Every role reads stream info; services may create corral's streams
/// (idempotently, whoever starts first); only the tracker updates them
/// (to the configured settings); nobody deletes or purges them.
fn streams(publish: &mut Vec<String>, subjects: &Subjects, create: bool, update: bool) {
    publish.push("$JS.API.INFO".into());
    for stream in [
        subjects.cmd_stream(),
        subjects.lifecycle_stream(),
        subjects.events_stream(),
        subjects.dlq_stream(),
    ] {
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        if create {
            publish.push(format!("$JS.API.STREAM.CREATE.{stream}"));
        }
        if update {
            publish.push(format!("$JS.API.STREAM.UPDATE.{stream}"));
        }
    }
}

fn tracker_ops(publish: &mut Vec<String>, subjects: &Subjects, ops: &[&str]) {
    publish.extend(ops.iter().map(|op| subjects.tracker(op)));
}

/// The permissions of `role` for a deployment's `subjects`.
pub fn permissions(role: Role, subjects: &Subjects) -> Permissions {
    let p = subjects.prefix();
    let mut publish = Vec::new();
    let mut subscribe = vec![format!("{}.>", role.inbox_prefix())];
    let mut allow_responses = false;
    match role {
        Role::Tracker => {
            streams(&mut publish, subjects, true, true);
            subscribe.push(subjects.tracker_all());
            allow_responses = true;
            // A stop between turns goes to a spawner as a session command.
            publish.extend([
                subjects.lifecycle_all(),
                subjects.cmd_stop_all(),
                subjects.cmd_session(),
                subjects.dlq_all(),
            ]);
            consume(
                &mut publish,
                &subjects.cmd_stream(),
                Subjects::TRACKER_STOP_CONSUMER,
            );
        }
        Role::Spawner => {
            streams(&mut publish, subjects, true, false);
            tracker_ops(
                &mut publish,
                subjects,
                &[
                    "claim",
                    "record_sandbox",
                    "transition",
                    "get",
                    "heartbeat",
                    "activity",
                    "release",
                ],
            );
            publish.extend([subjects.events_all(), subjects.dlq("cmd")]);
            consume(
                &mut publish,
                &subjects.cmd_stream(),
                Subjects::SPAWNER_CONSUMER,
            );
            // Stops reach the owner on the core subject; its agents'
            // events (progress, session ids) reset the run's inactivity
            // window.
            subscribe.extend([subjects.cmd_stop_all(), subjects.events_all()]);
        }
        Role::Reaper => {
            streams(&mut publish, subjects, true, false);
            tracker_ops(
                &mut publish,
                subjects,
                &["sweep", "transition", "get", "list", "spawners"],
            );
            // Kills on a node: the leader asks the node's reapers, which
            // answer; idle kept runs are paused with a session command.
            publish.extend([format!("{p}.node.*.kill"), subjects.cmd_session()]);
            subscribe.push(format!("{p}.node.>"));
            allow_responses = true;
            let bucket = subjects.reaper_lease_bucket();
            let kv = format!("KV_{bucket}");
            publish.extend([
                format!("$KV.{bucket}.>"),
                format!("$JS.API.STREAM.INFO.{kv}"),
                format!("$JS.API.STREAM.CREATE.{kv}"),
                format!("$JS.API.STREAM.MSG.GET.{kv}"),
                format!("$JS.API.DIRECT.GET.{kv}"),
                format!("$JS.API.DIRECT.GET.{kv}.>"),
            ]);
        }
        Role::Ingest => {
            streams(&mut publish, subjects, true, false);
            tracker_ops(&mut publish, subjects, &["get", "activity"]);
            publish.extend([subjects.events_all(), subjects.dlq("events")]);
            // The console: lists runs and nodes, and its buttons send what
            // the CLI sends (stop through the tracker, pause, resume and
            // continue as commands); it reads dead letters.
            tracker_ops(&mut publish, subjects, &["list", "stop", "spawners"]);
            publish.extend([
                subjects.cmd_continue(),
                subjects.cmd_session(),
                format!("$JS.API.STREAM.MSG.GET.{}", subjects.dlq_stream()),
            ]);
            consume(&mut publish, &subjects.events_stream(), "event-ingest");
            // Live tails: ordered consumers of one run's events.
            consume(&mut publish, &subjects.events_stream(), "*");
            // GenAI traces (`genai_traces`): ended runs from the lifecycle stream.
            consume(&mut publish, &subjects.lifecycle_stream(), "corral-genai");
            publish.push(subjects.dlq("genai"));
            // Webhooks: a durable consumer per endpoint on the lifecycle
            // stream (`corral-webhook-<name>`, named by the configuration).
            consume(&mut publish, &subjects.lifecycle_stream(), "*");
            publish.push(subjects.dlq("webhook"));
        }
        Role::Platform => {
            streams(&mut publish, subjects, false, false);
            publish.extend([
                subjects.cmd_run(),
                subjects.cmd_continue(),
                subjects.cmd_session(),
                subjects.cmd_stop_all(),
            ]);
            tracker_ops(
                &mut publish,
                subjects,
                &["submit", "get", "list", "stop", "cost", "spawners"],
            );
            for stream in [
                subjects.lifecycle_stream(),
                subjects.events_stream(),
                subjects.dlq_stream(),
            ] {
                consume(&mut publish, &stream, "*");
            }
            // `corral dlq`: read letters, and delete one once replayed (a
            // replay publishes to the letter's subject: commands; replaying
            // an event's letter needs a credential that may publish events).
            publish.extend([
                format!("$JS.API.STREAM.MSG.GET.{}", subjects.dlq_stream()),
                format!("$JS.API.STREAM.MSG.DELETE.{}", subjects.dlq_stream()),
            ]);
            // Watching a run: its lifecycle and output as they happen.
            subscribe.extend([subjects.lifecycle_all(), subjects.events_all()]);
        }
        Role::Analytics => {
            streams(&mut publish, subjects, false, false);
            for stream in [subjects.lifecycle_stream(), subjects.events_stream()] {
                consume(&mut publish, &stream, "*");
            }
            subscribe.extend([subjects.lifecycle_all(), subjects.events_all()]);
        }
    }
    Permissions {
        publish,
        subscribe,
        allow_responses,
    }
}

fn quoted(list: &[String]) -> String {
    list.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `authorization` block of a nats-server configuration: one nkey
/// user per role (`users`: role and public key), each with its permissions.
pub fn server_authorization(subjects: &Subjects, users: &[(Role, String)]) -> String {
    let mut conf = String::from(
        "# corral: one nkey user per role, least privilege (generated by `corral keys nats`).\nauthorization {\n  users = [\n",
    );
    for (role, public_key) in users {
        let permissions = permissions(*role, subjects);
        let _ = writeln!(conf, "    # {}", role.name());
        let _ = writeln!(conf, "    {{ nkey: \"{public_key}\", permissions: {{");
        let _ = writeln!(
            conf,
            "        publish: {{ allow: [{}] }}",
            quoted(&permissions.publish)
        );
        let _ = writeln!(
            conf,
            "        subscribe: {{ allow: [{}] }}",
            quoted(&permissions.subscribe)
        );
        if permissions.allow_responses {
            let _ = writeln!(conf, "        allow_responses: true");
        }
        let _ = writeln!(conf, "    }} }}");
    }
    conf.push_str("  ]\n}\n");
    conf
}

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Generated {
    /// The `authorization` block, to `include` in nats-server's config.
    pub auth_conf: PathBuf,
    /// Per role: its seed file and its environment file.
    pub roles: Vec<(Role, PathBuf, PathBuf)>,
}

/// Generates one nkey user per role under `dir`: `<role>.nk` (the seed,
/// mode 0600), `<role>.env` (`NATS_NKEY` and the inbox prefix, for a
/// service's environment) and `auth.conf` (public keys and permissions,
/// for the server). Existing seeds are kept, so running it again only
/// rewrites `auth.conf` (e.g. for another prefix).
pub fn generate(dir: &Path, subjects: &Subjects) -> std::io::Result<Generated> {
    std::fs::create_dir_all(dir)?;
    let mut users = Vec::new();
    let mut roles = Vec::new();
    for role in Role::ALL {
        let seed_file = dir.join(format!("{}.nk", role.name()));
        let seed = match std::fs::read_to_string(&seed_file) {
            Ok(text) => text.trim().to_owned(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let seed = nkeys::KeyPair::new_user()
                    .seed()
                    .map_err(|err| std::io::Error::other(err.to_string()))?;
                write_private(&seed_file, &format!("{seed}\n"))?;
                seed
            }
            Err(err) => return Err(err),
        };
        let pair = nkeys::KeyPair::from_seed(&seed)
            .map_err(|err| std::io::Error::other(format!("{}: {err}", seed_file.display())))?;
        users.push((role, pair.public_key()));
        let env_file = dir.join(format!("{}.env", role.name()));
        write_private(
            &env_file,
            &format!(
                "NATS_NKEY={}\nCORRAL_NATS_AUTH__INBOX_PREFIX={}\n",
                seed_file.display(),
                role.inbox_prefix()
            ),
        )?;
        roles.push((role, seed_file, env_file));
    }
    let auth_conf = dir.join("auth.conf");
    std::fs::write(&auth_conf, server_authorization(subjects, &users))?;
    Ok(Generated { auth_conf, roles })
}

/// Writes `text` to `path`, readable by its owner only (a secret).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_have_no_role_and_readers_publish_no_command() {
        let subjects = Subjects::default();
        let analytics = permissions(Role::Analytics, &subjects);
        assert!(
            analytics
                .publish
                .iter()
                .all(|s| s.starts_with("$JS.API.") || s.starts_with("$JS.ACK.")),
            "{:?}",
            analytics.publish
        );
        let spawner = permissions(Role::Spawner, &subjects);
        assert!(!spawner.publish.contains(&subjects.cmd_run()));
        assert!(!spawner.publish.contains(&subjects.tracker("stop")));
        let platform = permissions(Role::Platform, &subjects);
        assert!(!platform.publish.contains(&subjects.tracker("transition")));
        assert!(!platform.publish.contains(&subjects.lifecycle_all()));
        for role in Role::ALL {
            let p = permissions(role, &subjects);
            assert!(
                !p.publish
                    .iter()
                    .any(|s| s.contains("STREAM.DELETE") || s.contains("STREAM.PURGE")),
                "{role:?} may not delete or purge a stream"
            );
            assert_eq!(
                p.publish.iter().any(|s| s.contains("STREAM.UPDATE")),
                role == Role::Tracker,
                "only the tracker updates streams"
            );
            assert_eq!(p.subscribe[0], format!("_INBOX_{}.>", role.name()));
        }
    }

    #[test]
    fn generate_keeps_seeds_and_writes_public_keys_only_to_the_server_file() {
        let dir = tempfile::tempdir().expect("dir");
        let subjects = Subjects::default();
        let first = generate(dir.path(), &subjects).expect("generate");
        let seed = std::fs::read_to_string(&first.roles[0].1).expect("seed");
        assert!(seed.starts_with("SU"), "a user seed");
        let conf = std::fs::read_to_string(&first.auth_conf).expect("conf");
        assert!(!conf.contains(seed.trim()), "no seed in the server's file");
        assert_eq!(conf.matches("nkey: \"U").count(), Role::ALL.len());
        generate(dir.path(), &subjects).expect("again");
        assert_eq!(
            std::fs::read_to_string(&first.roles[0].1).expect("seed"),
            seed,
            "seeds are kept"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&first.roles[0].1)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "a seed is readable by its owner only");
    }
}
