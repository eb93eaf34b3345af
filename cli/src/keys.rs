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
        after_help = "Example:\n  corral keys api --id dashboard --scope events:read\n\nThe key is shown once; ingest keeps only its SHA-256. Revoke a key by removing its settings."
    )]
    Api {
        /// Key id (1-32 of a-z 0-9 _ -): names the key in settings, logs and limits.
        #[arg(long)]
        id: String,
        /// What the key may do: events:read (pages), events:stream (live tails).
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
            for scope in &scopes {
                if !["events:read", "events:stream"].contains(&scope.as_str()) {
                    bail!("--scope {scope:?}: known scopes are events:read, events:stream");
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
