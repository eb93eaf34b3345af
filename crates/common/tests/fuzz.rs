//! Run tokens an outsider presents, and configuration layers, fed arbitrary
//! input: no panic, and a token verifies exactly when it was minted with
//! the key and has not expired. A longer run:
//! `PROPTEST_CASES=1000000 cargo test --release -p corral-common --test fuzz`.

use std::collections::HashMap;

use corral_common::token::{self, Keyring};
use proptest::prelude::*;

const KEY: &[u8] = b"fuzz-key";

fn ring() -> Keyring {
    Keyring::single("k1", KEY)
}

proptest! {
    #[test]
    fn any_presented_token_is_judged_without_panic(text in "\\PC{0,120}", now in any::<i64>()) {
        let _ = ring().verify(&text, now);
    }

    #[test]
    fn a_token_looking_like_one_is_judged_without_panic(
        run_id in "[a-z0-9.*>-]{0,20}",
        expires in "[0-9-]{0,20}",
        mac in "[0-9a-f]{0,70}",
        now in any::<i64>(),
    ) {
        let _ = ring().verify(&format!("v1.{run_id}.{expires}.{mac}"), now);
        let _ = ring().verify(&format!("v2.k1.{run_id}.{expires}.{mac}"), now);
        let _ = ring().verify(&format!("v2.{run_id}.{expires}.{mac}"), now);
    }

    #[test]
    fn a_minted_token_verifies_for_its_run_until_it_expires_and_with_no_other_key(
        run_id in "[a-zA-Z0-9_-]{1,40}",
        expires in 0i64..4_102_444_800_000,
        now in 0i64..4_102_444_800_000,
    ) {
        let minted = ring().mint(&run_id, expires);
        match ring().verify(&minted, now) {
            Ok(verified) => {
                prop_assert_eq!(&verified, &run_id);
                prop_assert!(now <= expires);
            }
            Err(_) => prop_assert!(now > expires),
        }
        prop_assert!(Keyring::single("k1", b"another-key").verify(&minted, now).is_err());
        prop_assert!(Keyring::single("k2", KEY).verify(&minted, now).is_err());
        let v1 = token::mint_v1(KEY, &run_id, expires);
        prop_assert_eq!(ring().verify(&v1, now).is_ok(), now <= expires);
    }

    /// Configuration from the environment (what an operator sets): any
    /// value of any known key gives a config or an error, never a panic.
    #[test]
    fn any_environment_gives_a_config_or_an_error(
        values in prop::collection::vec(("\\PC{0,30}", 0usize..8), 0..6),
    ) {
        const KEYS: [&str; 8] = [
            "NATS_URL",
            "CORRAL_SUBJECT_PREFIX",
            "CORRAL_NATS_URL",
            "CORRAL_TIMEOUT_MS",
            "CORRAL_NESTED__LIMIT",
            "CORRAL_NAMES",
            "CORRAL_ENABLED",
            "CORRAL_UNKNOWN",
        ];
        let env: HashMap<String, String> = values
            .into_iter()
            .map(|(value, key)| (KEYS[key].to_owned(), value))
            .collect();
        let _ = corral_common::config::load::<Sample, ()>(None, &env, &());
    }

    /// A configuration file of any text.
    #[test]
    fn any_configuration_file_gives_a_config_or_an_error(text in "\\PC{0,200}") {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &text).expect("write");
        let _ = corral_common::config::load::<Sample, ()>(Some(&path), &HashMap::new(), &());
    }
}

/// A configuration with the shapes services use.
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Sample {
    nats_url: String,
    subject_prefix: String,
    timeout_ms: u64,
    nested: Nested,
    names: Vec<String>,
    enabled: bool,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Nested {
    limit: u32,
}
