//! Run tokens: what a sandbox shows to post its own run's events.
//!
//! `v1.<run_id>.<expires_ms>.<hex HMAC-SHA256(secret, "v1.<run_id>.<expires_ms>")>`.
//! The spawner mints one per run (expiring shortly after the run's deadline)
//! and hands it to the agent as `CORRAL_TOKEN`; event-ingest verifies it with
//! the same secret. A token proves the run id it names and nothing else.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

fn signature(secret: &[u8], claim: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(claim.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A token for `run_id`, valid until `expires_ms` (Unix ms).
pub fn mint(secret: &[u8], run_id: &str, expires_ms: i64) -> String {
    let claim = format!("v1.{run_id}.{expires_ms}");
    let signature = hex::encode(signature(secret, &claim));
    format!("{claim}.{signature}")
}

/// The run id a valid, unexpired token names.
pub fn verify(secret: &[u8], token: &str, now_ms: i64) -> Result<String, TokenError> {
    let (claim, signature_hex) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let mut parts = claim.splitn(3, '.');
    let (Some("v1"), Some(run_id), Some(expires)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let expires: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    let given = hex::decode(signature_hex).map_err(|_| TokenError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(claim.as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| TokenError::BadSignature)?;
    if now_ms > expires {
        return Err(TokenError::Expired);
    }
    Ok(run_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_run_until_it_expires() {
        let token = mint(b"secret", "run-1", 2000);
        assert_eq!(verify(b"secret", &token, 1000), Ok("run-1".to_owned()));
        assert_eq!(verify(b"secret", &token, 2001), Err(TokenError::Expired));
        assert_eq!(
            verify(b"other", &token, 1000),
            Err(TokenError::BadSignature)
        );
        let forged = token.replace("run-1", "run-2");
        assert_eq!(
            verify(b"secret", &forged, 1000),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify(b"secret", "nonsense", 1000),
            Err(TokenError::Malformed)
        );
    }
}
