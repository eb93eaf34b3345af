//! `corral keys`: the secrets a deployment needs, generated here so nobody
//! invents a weak one: read API keys for event ingest, run-token keys, and
//! least-privilege NATS users per role.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use corral_common::nats_roles::{self, Role};
use corral_proto::Subjects;
use rand::Rng;

use crate::commands::Global;

#[derive(Subcommand)]
pub enum Keys {
    /// A new API key for reading events from event ingest; prints the key
    /// once and the ingest settings that hold its hash.
    #[command(
        after_help = "Example:\n  corral keys api --id dashboard --scope events:read\n  corral keys api --id operator --scope events:read --scope events:stream --scope runs:control\n\nThe key is shown once; ingest keeps only its SHA-256. Revoke a key by removing its settings."
    )]
    Api {
        /// Key id (1-32 of a-z 0-9 _ -): names the key in settings, logs and limits.
        #[arg(long)]
        id: String,
        /// What the key may do: events:read (pages, the console), events:stream
        /// (live tails), runs:control (the console's stop, pause, resume and
        /// continue buttons). Repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", default_values = ["events:read", "events:stream"])]
        scopes: Vec<String>,
    },
    /// A new run-token key (32 random bytes, hex) for the spawners and
    /// ingest's keyring.
    #[command(
        after_help = "Rotation: add the new key to ingest first, then to the spawners (which sign with the greatest id, or CORRAL_TOKEN_SIGNING_KEY), and drop the old key once the longest run that may hold it is over."
    )]
    Token {
        /// Key id (1-32 of a-z 0-9 _ -); ids that sort by age (2026-12) need no signing setting.
        #[arg(long)]
        id: String,
    },
    /// NATS users for a deployment: one nkey per role (tracker, spawner,
    /// reaper, ingest, platform, analytics) with least-privilege permissions.
    #[command(
        after_help = "Writes <DIR>/auth.conf (public keys and permissions: `include` it in nats-server's configuration, see deploy/nats/secure.conf), <DIR>/<role>.nk (the seed, mode 0600) and <DIR>/<role>.env (NATS_NKEY and the role's reply inbox, for the service's environment). Seeds that exist are kept.\n\nExample:\n  corral keys nats --out deploy/nats/secrets && nats-server -c deploy/nats/secure.conf"
    )]
    Nats {
        /// Where to write the files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Do nothing when <DIR>/auth.conf exists (first-use setup).
        #[arg(long)]
        if_missing: bool,
    },
    /// Everything a secure deployment needs, in one directory: NATS users
    /// (<DIR>/nats), a run-token key, a read API key for the platform, a
    /// configuration file per service and environment files for the
    /// platform and analytics readers. docker-compose.yml runs it on first use.
    #[command(
        after_help = "Writes <DIR>/nats/ (as `corral keys nats`), <DIR>/<service>.yaml for tracker, spawner, reaper and event-ingest (start each with --config <DIR>/<service>.yaml), <DIR>/platform.env and <DIR>/analytics.env (NATS seed and inbox; the platform's also its read API key as CORRAL_API_KEY). Every file is readable by its owner only.\n\nExample:\n  corral keys init --out /etc/corral --if-missing\n  corral serve tracker --config /etc/corral/tracker.yaml"
    )]
    Init {
        /// Where to write the files (an absolute path: the files name each other by it).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Do nothing when <DIR> was set up before (first-use setup).
        #[arg(long)]
        if_missing: bool,
        /// NATS URL the generated service configurations name.
        #[arg(long, value_name = "URL", default_value = "nats://nats:4222")]
        service_nats_url: String,
    },
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        bail!("--id {id:?}: use 1-32 of a-z 0-9 _ - (ids travel in environment names, lowercased)")
    }
}

fn random_text(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub async fn keys(global: &Global, command: Keys) -> anyhow::Result<ExitCode> {
    match command {
        Keys::Api { id, scopes } => {
            check_id(&id)?;
            let known = corral_event_ingest::auth::Scope::ALL.map(|s| s.name());
            for scope in &scopes {
                if !known.contains(&scope.as_str()) {
                    bail!("--scope {scope:?}: known scopes are {}", known.join(", "));
                }
            }
            let key = format!("ck_{id}_{}", random_text(40));
            let sha256 = corral_event_ingest::auth::hash_key(&key);
            let upper = id.to_ascii_uppercase();
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({ "id": id, "key": key, "sha256": sha256, "scopes": scopes })
                );
            } else {
                println!("key (shown once; send it as `Authorization: Bearer <key>`):\n  {key}\n");
                println!("event ingest settings (environment):");
                println!("  CORRAL_API_KEYS__{upper}__SHA256={sha256}");
                println!("  CORRAL_API_KEYS__{upper}__SCOPES=[{}]", scopes.join(", "));
                println!(
                    "\nor YAML (--config):\n  api_keys:\n    {id}:\n      sha256: {sha256}\n      scopes: [{}]",
                    scopes.join(", ")
                );
            }
        }
        Keys::Token { id } => {
            check_id(&id)?;
            let secret = hex::encode(rand::random::<[u8; 32]>());
            let upper = id.to_ascii_uppercase();
            if global.json {
                println!("{}", serde_json::json!({ "id": id, "secret": secret }));
            } else {
                println!("run-token key {id} (the spawners and event ingest need it):");
                println!("  CORRAL_TOKEN_KEYS__{upper}={secret}");
            }
        }
        Keys::Init {
            out,
            if_missing,
            service_nats_url,
        } => {
            if if_missing && out.join("event-ingest.yaml").exists() {
                eprintln!("{} was set up before: kept", out.display());
                return Ok(ExitCode::SUCCESS);
            }
            init(&out, &global.prefix, &service_nats_url)?;
            println!(
                "secure configuration for prefix {} written to {}",
                global.prefix,
                out.display()
            );
        }
        Keys::Nats { out, if_missing } => {
            if if_missing && out.join("auth.conf").exists() {
                eprintln!("{} exists: kept", out.join("auth.conf").display());
                return Ok(ExitCode::SUCCESS);
            }
            let subjects = Subjects::new(&global.prefix)?;
            let generated = nats_roles::generate(&out, &subjects)
                .with_context(|| format!("cannot write NATS users under {}", out.display()))?;
            println!(
                "NATS users for prefix {} written to {}:",
                global.prefix,
                out.display()
            );
            println!(
                "  server:  include {} in nats-server's configuration",
                generated.auth_conf.display()
            );
            for (role, _, env) in &generated.roles {
                let what = match role {
                    Role::Platform => "the platform, `corral` CLI users",
                    Role::Analytics => "read-only consumers",
                    _ => "the service",
                };
                println!("  {:<9} {} ({what})", role.name(), env.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the files of `corral keys init`.
fn init(out: &std::path::Path, prefix: &str, nats_url: &str) -> anyhow::Result<()> {
    if !out.is_absolute() {
        bail!(
            "--out {}: give an absolute path (the files name each other by it)",
            out.display()
        );
    }
    let subjects = Subjects::new(prefix)?;
    let generated = nats_roles::generate(&out.join("nats"), &subjects)
        .with_context(|| format!("cannot write NATS users under {}", out.display()))?;
    let seed_of = |role: Role| -> anyhow::Result<(PathBuf, String)> {
        let (_, seed_file, _) = generated
            .roles
            .iter()
            .find(|(r, _, _)| *r == role)
            .context("every role is generated")?;
        let seed = std::fs::read_to_string(seed_file)?.trim().to_owned();
        Ok((seed_file.clone(), seed))
    };
    let token_id = chrono::Utc::now().format("k%Y%m").to_string();
    let token_secret = hex::encode(rand::random::<[u8; 32]>());
    let api_key = format!("ck_platform_{}", random_text(40));
    let api_hash = corral_event_ingest::auth::hash_key(&api_key);
    let common = |role: Role| -> anyhow::Result<String> {
        let (seed_file, _) = seed_of(role)?;
        Ok(format!(
            "# generated by `corral keys init`; secrets: keep this file private\nnats_url: {nats_url}\nsubject_prefix: {prefix}\nnats_auth:\n  nkey_file: {}\n  inbox_prefix: {}\n",
            seed_file.display(),
            role.inbox_prefix()
        ))
    };
    let token_keys = format!("token_keys:\n  {token_id}: {token_secret}\n");
    let files = [
        ("tracker.yaml", common(Role::Tracker)?),
        ("reaper.yaml", common(Role::Reaper)?),
        ("spawner.yaml", common(Role::Spawner)? + &token_keys),
        (
            "event-ingest.yaml",
            common(Role::Ingest)?
                + &token_keys
                + &format!(
                    "api_keys:\n  platform:\n    sha256: {api_hash}\n    scopes: [events:read, events:stream]\n"
                ),
        ),
    ];
    for (name, text) in files {
        nats_roles::write_private(&out.join(name), &text)?;
    }
    for (role, extra) in [
        (Role::Platform, format!("CORRAL_API_KEY={api_key}\n")),
        (Role::Analytics, String::new()),
    ] {
        let (_, seed) = seed_of(role)?;
        nats_roles::write_private(
            &out.join(format!("{}.env", role.name())),
            &format!(
                "CORRAL_SUBJECT_PREFIX={prefix}\nCORRAL_NATS_AUTH__NKEY_SEED={seed}\nCORRAL_NATS_AUTH__INBOX_PREFIX={}\n{extra}",
                role.inbox_prefix()
            ),
        )?;
    }
    Ok(())
}
