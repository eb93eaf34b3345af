//! Run tokens: what a sandbox shows to post its own run's events.
//!
//! `v2.<key_id>.<run_id>.<expires_ms>.<hex HMAC-SHA256(key, "v2.<key_id>.<run_id>.<expires_ms>")>`.
//! The spawner mints one per run (expiring shortly after the run's deadline)
//! with the signing key of its [`Keyring`] and hands it to the agent as
//! `CORRAL_TOKEN`; event-ingest verifies it with whichever key of its ring
//! the token names. A token proves the run id it names and nothing else.
//!
//! Rotation: add the new key to every ring (ingest first), roll the
//! spawners so they sign with it, and drop the old key once the longest
//! run that may hold a token signed with it is over. No running agent ever
//! shows a token its ingest cannot check.
//!
//! Tokens of the earlier form `v1.<run_id>.<expires_ms>.<sig>` (no key id)
//! are checked against every key of the ring, so an upgrade does not cut
//! off agents already running.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Secret;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token signed with key {0:?}, which this service does not hold (rotated out?)")]
    UnknownKey(String),
}

/// Secrets this short, or these well-known values, are refused outside
/// dev mode.
pub const MIN_SECRET_BYTES: usize = 32;
const KNOWN_WEAK: [&str; 8] = [
    "change-me",
    "changeme",
    "secret",
    "password",
    "corral",
    "dev",
    "test",
    "test-token-secret",
];

/// Why `secret` (the value of `setting`) is too weak to use outside dev
/// mode, if it is.
pub fn weakness(setting: &str, secret: &str) -> Option<String> {
    if secret.is_empty() {
        return Some(format!("{setting} is empty"));
    }
    if KNOWN_WEAK.contains(&secret.to_ascii_lowercase().as_str()) {
        return Some(format!(
            "{setting} is a well-known placeholder; generate one (e.g. `openssl rand -hex 32`)"
        ));
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Some(format!(
            "{setting} is {} bytes; at least {MIN_SECRET_BYTES} are needed (e.g. `openssl rand -hex 32`)",
            secret.len()
        ));
    }
    None
}

/// Whether `id` may name a key: 1–32 of `[A-Za-z0-9_-]` (it travels in
/// the token between dots).
fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Token keys by id; one of them signs.
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<String, Vec<u8>>,
    signing: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("signing", &self.signing)
            .finish()
    }
}

impl Keyring {
    /// A ring from the configured keys (`token_keys`, by id), the single
    /// `token_secret` of earlier versions (key id `default`), and the id
    /// to sign with (`token_signing_key`; empty: the greatest id, so ids
    /// that sort by age, such as `2026-12`, need no setting). Outside
    /// `dev_mode` a weak key is refused, naming its setting.
    pub fn from_config(
        keys: &BTreeMap<String, Secret>,
        legacy: &Secret,
        signing: &str,
        dev_mode: bool,
    ) -> Result<Keyring, String> {
        let mut ring = BTreeMap::new();
        for (id, secret) in keys {
            if !valid_key_id(id) {
                return Err(format!(
                    "token_keys: key id {id:?} must be 1-32 of A-Z a-z 0-9 _ -"
                ));
            }
            let setting = format!(
                "token_keys.{id} (CORRAL_TOKEN_KEYS__{})",
                id.to_ascii_uppercase()
            );
            check(&setting, secret, dev_mode)?;
            ring.insert(id.clone(), secret.expose().as_bytes().to_vec());
        }
        if !legacy.expose().is_empty() || ring.is_empty() {
            check("token_secret (CORRAL_TOKEN_SECRET)", legacy, dev_mode)?;
            if ring.contains_key("default") {
                return Err(
                    "token_secret and token_keys.default both name key `default`; keep one".into(),
                );
            }
            ring.insert("default".to_owned(), legacy.expose().as_bytes().to_vec());
        }
        let signing = if signing.is_empty() {
            ring.keys().next_back().cloned().unwrap_or_default()
        } else if ring.contains_key(signing) {
            signing.to_owned()
        } else {
            return Err(format!(
                "token_signing_key {signing:?} is not in token_keys ({})",
                ring.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        Ok(Keyring {
            keys: ring,
            signing,
        })
    }

    /// A ring of one key, for tests and tools.
    pub fn single(id: &str, secret: &[u8]) -> Keyring {
        Keyring {
            keys: BTreeMap::from([(id.to_owned(), secret.to_vec())]),
            signing: id.to_owned(),
        }
    }

    /// The id new tokens are signed with.
    pub fn signing_key_id(&self) -> &str {
        &self.signing
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// A token for `run_id`, valid until `expires_ms` (Unix ms), signed
    /// with the signing key.
    pub fn mint(&self, run_id: &str, expires_ms: i64) -> String {
        let claim = format!("v2.{}.{run_id}.{expires_ms}", self.signing);
        let signature = hex::encode(signature(&self.keys[&self.signing], &claim));
        format!("{claim}.{signature}")
    }

    /// The run id a valid, unexpired token names.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<String, TokenError> {
        let (claim, signature_hex) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let given = hex::decode(signature_hex).map_err(|_| TokenError::Malformed)?;
        let parts: Vec<&str> = claim.split('.').collect();
        let (run_id, expires) = match parts.as_slice() {
            ["v2", key_id, run_id, expires] => {
                let key = self
                    .keys
                    .get(*key_id)
                    .ok_or_else(|| TokenError::UnknownKey((*key_id).to_owned()))?;
                check_signature(key, claim, &given)?;
                (run_id, expires)
            }
            ["v1", run_id, expires] => {
                if !self
                    .keys
                    .values()
                    .any(|key| check_signature(key, claim, &given).is_ok())
                {
                    return Err(TokenError::BadSignature);
                }
                (run_id, expires)
            }
            _ => return Err(TokenError::Malformed),
        };
        let expires: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        if now_ms > expires {
            return Err(TokenError::Expired);
        }
        Ok((*run_id).to_owned())
    }
}

fn check(setting: &str, secret: &Secret, dev_mode: bool) -> Result<(), String> {
    match weakness(setting, secret.expose()) {
        Some(why) if secret.expose().is_empty() || !dev_mode => Err(format!(
            "{why}{}",
            if dev_mode {
                ""
            } else {
                " (dev_mode, CORRAL_DEV_MODE=true, allows a weak one on a laptop)"
            }
        )),
        Some(why) => {
            tracing::warn!("{why}: accepted in dev mode only");
            Ok(())
        }
        None => Ok(()),
    }
}

fn signature(secret: &[u8], claim: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(claim.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn check_signature(secret: &[u8], claim: &str, given: &[u8]) -> Result<(), TokenError> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(claim.as_bytes());
    mac.verify_slice(given)
        .map_err(|_| TokenError::BadSignature)
}

/// A `v1` token (no key id), as versions before the keyring minted them.
pub fn mint_v1(secret: &[u8], run_id: &str, expires_ms: i64) -> String {
    let claim = format!("v1.{run_id}.{expires_ms}");
    let signature = hex::encode(signature(secret, &claim));
    format!("{claim}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0123456789abcdef0123456789abcdef-one";
    const K2: &str = "0123456789abcdef0123456789abcdef-two";

    fn ring(keys: &[(&str, &str)], signing: &str) -> Keyring {
        let keys = keys
            .iter()
            .map(|(id, s)| ((*id).to_owned(), Secret::new(*s)))
            .collect();
        Keyring::from_config(&keys, &Secret::default(), signing, false).expect("ring")
    }

    #[test]
    fn a_token_names_its_run_until_it_expires() {
        let ring = Keyring::single("k", b"secret");
        let token = ring.mint("run-1", 2000);
        assert!(token.starts_with("v2.k.run-1.2000."), "{token}");
        assert_eq!(ring.verify(&token, 1000), Ok("run-1".to_owned()));
        assert_eq!(ring.verify(&token, 2001), Err(TokenError::Expired));
        let other = Keyring::single("k", b"other");
        assert_eq!(other.verify(&token, 1000), Err(TokenError::BadSignature));
        let forged = token.replace("run-1", "run-2");
        assert_eq!(ring.verify(&forged, 1000), Err(TokenError::BadSignature));
        assert_eq!(ring.verify("nonsense", 1000), Err(TokenError::Malformed));
        assert_eq!(
            ring.verify("v2.k.a.b.c.dd", 1000),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_their_key_is_dropped() {
        let before = ring(&[("k1", K1)], "");
        let old = before.mint("run-1", 10_000);
        // Step 1: every ring gets k2; the signers still sign with k1.
        let both = ring(&[("k1", K1), ("k2", K2)], "k1");
        assert_eq!(both.verify(&old, 0), Ok("run-1".to_owned()));
        // Step 2: the signers sign with k2 (the greatest id, by default).
        let rolled = ring(&[("k1", K1), ("k2", K2)], "");
        assert_eq!(rolled.signing_key_id(), "k2");
        let new = rolled.mint("run-2", 10_000);
        assert_eq!(both.verify(&new, 0), Ok("run-2".to_owned()));
        assert_eq!(rolled.verify(&old, 0), Ok("run-1".to_owned()));
        // Step 3: k1 dropped once no run may hold it.
        let after = ring(&[("k2", K2)], "");
        assert_eq!(after.verify(&new, 0), Ok("run-2".to_owned()));
        assert_eq!(
            after.verify(&old, 0),
            Err(TokenError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn v1_tokens_of_earlier_versions_are_checked_against_every_key() {
        let both = ring(&[("k1", K1), ("k2", K2)], "");
        let v1 = mint_v1(K1.as_bytes(), "run-1", 10_000);
        assert_eq!(both.verify(&v1, 0), Ok("run-1".to_owned()));
        let other = ring(&[("k3", K2)], "");
        assert_eq!(other.verify(&v1, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn weak_or_missing_keys_are_refused_outside_dev_mode_naming_the_setting() {
        let none = BTreeMap::new();
        let empty = Keyring::from_config(&none, &Secret::default(), "", true).expect_err("refused");
        assert!(
            empty.contains("token_secret (CORRAL_TOKEN_SECRET) is empty"),
            "{empty}"
        );
        let weak =
            Keyring::from_config(&none, &Secret::new("change-me"), "", false).expect_err("refused");
        assert!(weak.contains("well-known placeholder"), "{weak}");
        assert!(weak.contains("CORRAL_DEV_MODE"), "{weak}");
        assert!(Keyring::from_config(&none, &Secret::new("change-me"), "", true).is_ok());
        let keys = BTreeMap::from([("k1".to_owned(), Secret::new("short"))]);
        let short =
            Keyring::from_config(&keys, &Secret::default(), "", false).expect_err("refused");
        assert!(
            short.contains("token_keys.k1 (CORRAL_TOKEN_KEYS__K1) is 5 bytes"),
            "{short}"
        );
        let keys = BTreeMap::from([("k1".to_owned(), Secret::new(K1))]);
        let missing =
            Keyring::from_config(&keys, &Secret::default(), "k9", false).expect_err("refused");
        assert!(
            missing.contains("token_signing_key \"k9\" is not in token_keys (k1)"),
            "{missing}"
        );
        let keys = BTreeMap::from([("a.b".to_owned(), Secret::new(K1))]);
        assert!(Keyring::from_config(&keys, &Secret::default(), "", false).is_err());
    }
}
