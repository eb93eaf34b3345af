//! Layered configuration: defaults < YAML file < environment < flags.
//!
//! Every service has one typed struct (with `deny_unknown_fields`) that
//! implements `Default + Serialize + Deserialize`. [`load`] layers the
//! struct's defaults, an optional YAML file, the environment and the
//! command-line flags (a serializable struct whose `None` fields are skipped),
//! and names the offending key and its source on error.
//!
//! The environment is an argument, so tests never mutate the process's.
//! For a field `nats_url` the variable is `CORRAL_NATS_URL`; a nested field
//! `prices.local` is `CORRAL_PRICES__LOCAL`. The conventional `NATS_URL` and
//! `DATABASE_URL` are honoured too (below their `CORRAL_` forms). Variables
//! that name no field of the struct are ignored: several services share one
//! environment.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use figment::providers::{Format, Serialized, Yaml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A configuration error; its message names the key and where it came from.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// Environment variables without the `CORRAL_` prefix that map to a field
/// (dots: a nested field). The `NATS_*` ones are the NATS CLI's own.
const CONVENTIONAL: [(&str, &str); 10] = [
    ("NATS_URL", "nats_url"),
    ("DATABASE_URL", "database_url"),
    ("NATS_CREDS", "nats_auth.creds_file"),
    ("NATS_NKEY", "nats_auth.nkey_file"),
    ("NATS_USER", "nats_auth.user"),
    ("NATS_PASSWORD", "nats_auth.password"),
    ("NATS_TOKEN", "nats_auth.token"),
    ("NATS_CA", "nats_auth.tls_ca"),
    ("NATS_CERT", "nats_auth.tls_cert"),
    ("NATS_KEY", "nats_auth.tls_key"),
];

/// An environment value as figment reads one (numbers, booleans, arrays,
/// quoted strings), except where figment 0.10's unescaping slices a string
/// by character index and panics: a value with a backslash and a non-ASCII
/// character is taken as the string it is (found by `tests/fuzz.rs`).
fn env_value(raw: &str) -> Value {
    if raw.contains('\\') && !raw.is_ascii() {
        return Value::from(raw.to_owned());
    }
    raw.parse::<Value>().unwrap_or_else(|never| match never {})
}

/// Loads `T` from its defaults, `file`, `env` and `flags`, in that order of
/// increasing precedence.
pub fn load<T, F>(
    file: Option<&Path>,
    env: &HashMap<String, String>,
    flags: &F,
) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned,
    F: Serialize,
{
    let known = top_level_keys(&T::default())?;
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!(
                "configuration file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Yaml::file_exact(path));
    }
    figment = figment
        .merge(EnvLayer::new(env, &known, false))
        .merge(EnvLayer::new(env, &known, true))
        .merge(Serialized::defaults(flags));
    figment.extract_lossy::<T>().map_err(|errors| {
        let text: Vec<String> = errors.into_iter().map(|e| e.to_string()).collect();
        ConfigError(text.join("; "))
    })
}

fn top_level_keys<T: Serialize>(value: &T) -> Result<Vec<String>, ConfigError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => Ok(map.keys().cloned().collect()),
        Ok(_) => Err(ConfigError("a configuration must be a struct".into())),
        Err(err) => Err(ConfigError(err.to_string())),
    }
}

/// The part of the environment that names fields of the struct.
struct EnvLayer {
    dict: Dict,
    name: String,
}

impl EnvLayer {
    fn new(env: &HashMap<String, String>, known: &[String], prefixed: bool) -> EnvLayer {
        let mut dict = Dict::new();
        let sorted: BTreeMap<_, _> = env.iter().collect();
        for (var, raw) in sorted {
            let path: Vec<String> = if prefixed {
                let Some(rest) = var.strip_prefix("CORRAL_") else {
                    continue;
                };
                rest.split("__").map(|p| p.to_ascii_lowercase()).collect()
            } else {
                match CONVENTIONAL.iter().find(|(name, _)| name == var) {
                    Some((_, field)) => field.split('.').map(str::to_owned).collect(),
                    None => continue,
                }
            };
            if path.iter().any(|p| p.is_empty()) || !known.contains(&path[0]) {
                continue;
            }
            insert(&mut dict, &path, env_value(raw));
        }
        let name = if prefixed {
            "CORRAL_* environment variables"
        } else {
            "NATS_*/DATABASE_URL environment variables"
        };
        EnvLayer {
            dict,
            name: name.to_owned(),
        }
    }
}

fn insert(dict: &mut Dict, path: &[String], value: Value) {
    let (first, rest) = path
        .split_first()
        .expect("an env key path should not be empty");
    if rest.is_empty() {
        dict.insert(first.clone(), value);
        return;
    }
    let entry = dict
        .entry(first.clone())
        .or_insert_with(|| Value::from(Dict::new()));
    if let Value::Dict(_, inner) = entry {
        insert(inner, rest, value);
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// `home`, or `$HOME/.corral` when it is empty: where local sandboxes live.
pub fn corral_home(home: &Path) -> std::path::PathBuf {
    if !home.as_os_str().is_empty() {
        return home.to_path_buf();
    }
    let base = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(".corral")
}

/// `deployment`, or the subject prefix when it is empty: the value of the
/// `corral.deployment` label.
pub fn deployment_label(deployment: &str, subject_prefix: &str) -> String {
    if deployment.is_empty() {
        subject_prefix
    } else {
        deployment
    }
    .to_owned()
}

/// `configured`, or a fresh instance id `<host>-<pid>-<random>`.
pub fn instance_id(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let random = format!(
        "{:08x}",
        std::process::id().wrapping_mul(2_654_435_761) ^ now_nanos()
    );
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &random[random.len() - 6..]
    )
}

fn now_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// The flags every service takes: its YAML file, NATS and the subject prefix.
/// Each service's `Flags` flattens these and adds its own.
#[derive(Clone, Debug, Default, Serialize, clap::Args)]
pub struct CommonFlags {
    /// YAML configuration file (keys as in the service's config struct).
    #[arg(long, short = 'c', value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<std::path::PathBuf>,
    /// NATS server URL, or a cluster's comma-separated seed list [env: NATS_URL, CORRAL_NATS_URL; default nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Subject prefix shared by every service of a deployment [env: CORRAL_SUBJECT_PREFIX; default corral].
    #[arg(long, value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
    #[command(flatten)]
    #[serde(rename = "nats_auth", skip_serializing_if = "NatsAuthFlags::is_empty")]
    pub nats_auth: NatsAuthFlags,
}

/// NATS credential and TLS files from the command line (user, password
/// and token only from the environment or the file: never in `ps`).
#[derive(Clone, Debug, Default, Serialize, clap::Args)]
pub struct NatsAuthFlags {
    /// NATS credentials file (JWT + nkey seed) [env: NATS_CREDS].
    #[arg(long = "nats-creds", global = true, value_name = "FILE")]
    #[serde(rename = "creds_file", skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<std::path::PathBuf>,
    /// File holding the NATS nkey user seed [env: NATS_NKEY].
    #[arg(long = "nats-nkey", global = true, value_name = "FILE")]
    #[serde(rename = "nkey_file", skip_serializing_if = "Option::is_none")]
    pub nkey_file: Option<std::path::PathBuf>,
    /// CA certificate the NATS server's must chain to (TLS on) [env: NATS_CA].
    #[arg(long = "nats-ca", global = true, value_name = "FILE")]
    #[serde(rename = "tls_ca", skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate for mutual TLS with NATS [env: NATS_CERT].
    #[arg(
        long = "nats-cert",
        global = true,
        value_name = "FILE",
        requires = "tls_key"
    )]
    #[serde(rename = "tls_cert", skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client key for mutual TLS with NATS [env: NATS_KEY].
    #[arg(
        long = "nats-key",
        global = true,
        value_name = "FILE",
        requires = "tls_cert"
    )]
    #[serde(rename = "tls_key", skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl NatsAuthFlags {
    /// Sets in `auth` what these flags give (for a command whose flags
    /// were parsed before the service's configuration was loaded).
    pub fn apply(&self, auth: &mut crate::nats::NatsAuth) {
        let set = |from: &Option<std::path::PathBuf>, to: &mut Option<std::path::PathBuf>| {
            if from.is_some() {
                to.clone_from(from);
            }
        };
        set(&self.creds_file, &mut auth.creds_file);
        set(&self.nkey_file, &mut auth.nkey_file);
        set(&self.tls_ca, &mut auth.tls_ca);
        set(&self.tls_cert, &mut auth.tls_cert);
        set(&self.tls_key, &mut auth.tls_key);
    }

    pub fn is_empty(&self) -> bool {
        self.creds_file.is_none()
            && self.nkey_file.is_none()
            && self.tls_ca.is_none()
            && self.tls_cert.is_none()
            && self.tls_key.is_none()
    }
}

impl CommonFlags {
    /// Layers defaults, the file, `env` and `flags` (a service's whole
    /// `Flags`, these included) into the service's config.
    pub fn load<T, F>(&self, env: &HashMap<String, String>, flags: &F) -> Result<T, ConfigError>
    where
        T: Default + Serialize + DeserializeOwned,
        F: Serialize,
    {
        load(self.config.as_deref(), env, flags)
    }
}

/// The process environment, for `main`s to hand to [`load`].
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        nats_url: String,
        max_runs: u32,
        verbose: bool,
        home: Option<String>,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                nats_url: "nats://127.0.0.1:4222".into(),
                max_runs: 10,
                verbose: false,
                home: None,
            }
        }
    }

    /// figment 0.10 panics unescaping such a value (found by fuzzing).
    #[test]
    fn a_value_with_a_backslash_after_a_non_ascii_character_is_taken_as_it_is() {
        for raw in ["\"é\\n\"", "é\\", "\"日本\\\"\"", "[\"é\\t\"]"] {
            let env = HashMap::from([("NATS_URL".to_owned(), raw.to_owned())]);
            let loaded: Sample = load(None, &env, &Flags::default()).expect("loads");
            assert_eq!(loaded.nats_url, raw, "taken as it is");
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        max_runs: Option<u32>,
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("corral-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("c.yaml");
        std::fs::write(&file, "max_runs: 20\nverbose: true\n").expect("write");

        let only_defaults: Sample = load(None, &env(&[]), &Flags::default()).expect("load");
        assert_eq!(only_defaults, Sample::default());

        let with_file: Sample = load(Some(&file), &env(&[]), &Flags::default()).expect("load");
        assert_eq!(with_file.max_runs, 20);
        assert!(with_file.verbose);

        let with_env: Sample = load(
            Some(&file),
            &env(&[("CORRAL_MAX_RUNS", "30"), ("NATS_URL", "nats://a:1")]),
            &Flags::default(),
        )
        .expect("load");
        assert_eq!(with_env.max_runs, 30);
        assert_eq!(with_env.nats_url, "nats://a:1");

        let with_flags: Sample = load(
            Some(&file),
            &env(&[
                ("CORRAL_MAX_RUNS", "30"),
                ("CORRAL_NATS_URL", "nats://b:2"),
                ("NATS_URL", "nats://a:1"),
            ]),
            &Flags { max_runs: Some(40) },
        )
        .expect("load");
        assert_eq!(with_flags.max_runs, 40);
        assert_eq!(
            with_flags.nats_url, "nats://b:2",
            "CORRAL_ form wins over the conventional one"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn unrelated_environment_variables_are_ignored() {
        let loaded: Sample = load(
            None,
            &env(&[("CORRAL_SOMETHING_ELSE", "x"), ("PATH", "/bin")]),
            &Flags::default(),
        )
        .expect("unrelated variables should not fail the load");
        assert_eq!(loaded, Sample::default());
    }

    #[test]
    fn errors_name_the_bad_key_and_its_source() {
        let err = load::<Sample, _>(
            None,
            &env(&[("CORRAL_MAX_RUNS", "many")]),
            &Flags::default(),
        )
        .expect_err("a word is not a number");
        let text = err.to_string();
        assert!(text.contains("max_runs"), "{text}");
        assert!(text.contains("CORRAL_"), "{text}");

        let dir = std::env::temp_dir().join(format!("corral-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("c.yaml");
        std::fs::write(&file, "max_runz: 20\n").expect("write");
        let err = load::<Sample, _>(Some(&file), &env(&[]), &Flags::default())
            .expect_err("an unknown key should be refused");
        assert!(err.to_string().contains("max_runz"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
