//! corral on a NATS server that authenticates every party and gives each
//! only its subjects (the users `corral keys nats` generates): the whole
//! lifecycle works with no permissions violation, a client without
//! credentials is refused at connect, and a credential used outside its
//! permissions is refused by the server.

use std::time::Duration;

use corral_common::nats::NatsAuth;
use corral_common::nats_roles::{self, Role};
use corral_proto::v1::RunState;
use corral_tests::sessions::{idle_after, released, stop_run};
use corral_tests::{PrivateNats, TestEnv, eventually};

/// A console key that may press the buttons.
const OPERATOR_KEY: &str = "ck_operator_0123456789abcdefghijklmnopqrst";

const LIMIT: Duration = Duration::from_secs(60);

fn auth_of(generated: &nats_roles::Generated, role: Role) -> NatsAuth {
    let (_, seed, _) = generated
        .roles
        .iter()
        .find(|(r, _, _)| *r == role)
        .expect("every role is generated");
    NatsAuth {
        nkey_file: Some(seed.clone()),
        inbox_prefix: Some(role.inbox_prefix()),
        ..Default::default()
    }
}

fn violations(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains("Violation"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_party_works_with_only_its_own_subjects() {
    // The users are generated for the test's prefix, then a server of the
    // test's own starts with them.
    let mut env = TestEnv::new().await;
    let generated =
        nats_roles::generate(&env.home.join("nats-keys"), &env.subjects).expect("generate users");
    let nats = PrivateNats::start_with_config(
        &std::fs::read_to_string(&generated.auth_conf).expect("auth.conf"),
    );
    env.nats_url = nats.url();

    // No credential: refused at connect, with the server's reason.
    let refused = corral_client::Client::connect(&nats.url(), &env.prefix, "anonymous")
        .await
        .err()
        .expect("a client without credentials is refused");
    let text = refused.to_string().to_ascii_lowercase();
    assert!(text.contains("authoriz"), "{refused}");

    env.nats_auth = auth_of(&generated, Role::Platform);
    let mut tracker_config = env.tracker_config();
    tracker_config.nats_auth = auth_of(&generated, Role::Tracker);
    let tracker = env.start_tracker_with(tracker_config).await;
    let mut spawner_config = env.spawner_config();
    spawner_config.nats_auth = auth_of(&generated, Role::Spawner);
    let spawner = env.start_spawner_with(spawner_config).await;
    let mut reaper_config = env.reaper_config();
    reaper_config.nats_auth = auth_of(&generated, Role::Reaper);
    let reaper = env.start_reaper_with(reaper_config).await;
    let mut ingest_config = env.ingest_config("127.0.0.1:0");
    ingest_config.nats_auth = auth_of(&generated, Role::Ingest);
    ingest_config.api_keys.insert(
        "operator".into(),
        corral_event_ingest::auth::ApiKey {
            sha256: corral_event_ingest::auth::hash_key(OPERATOR_KEY),
            scopes: vec!["events:read".into(), "runs:control".into()],
        },
    );
    let (ingest, url) = env.start_ingest_with(ingest_config).await;
    let client = env.client().await;

    // A run to its end: output stored by ingest and read back over HTTP.
    let command = env.command(&["sh", "-c", "echo secure-1; echo secure-2"]);
    client
        .start_run(&command)
        .await
        .expect("submit as the platform");
    let run = env.wait_terminal(&client, &command.run_id, LIMIT).await;
    assert_eq!(run.state(), RunState::Completed, "{}", run.reason);
    let http = corral_tests::http();
    let lines = eventually("ingest stores the run's output", LIMIT, || async {
        let page: serde_json::Value = http
            .get(format!("{url}/v1/runs/{}/events", command.run_id))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let lines: Vec<String> = page["events"]
            .as_array()?
            .iter()
            .filter_map(|e| e["data"]["line"].as_str().map(str::to_owned))
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await;
    assert_eq!(lines, ["secure-1", "secure-2"]);

    // A stop from the platform reaches the owner.
    let sleeper = env.command(&["sleep", "300"]);
    client.start_run(&sleeper).await.expect("submit");
    env.wait_state(&client, &sleeper.run_id, RunState::Running)
        .await;
    stop_run(&client, &sleeper.run_id, "secure stop").await;
    let stopped = env.wait_terminal(&client, &sleeper.run_id, LIMIT).await;
    assert_eq!(stopped.state(), RunState::Stopped, "{}", stopped.reason);

    // The console, under ingest's credential: its views, and its stop
    // button, which reaches the owner as the platform's stop does.
    let operator = reqwest::Client::new();
    for view in ["/console", "/console/nodes", "/console/dead-letters"] {
        let page = operator
            .get(format!("{url}{view}"))
            .header("authorization", format!("Bearer {OPERATOR_KEY}"))
            .send()
            .await
            .expect("console");
        assert!(page.status().is_success(), "{view}: {}", page.status());
        let page = page.text().await.expect("page");
        assert!(!page.contains("did not answer"), "{view}: {page}");
        assert!(!page.contains("dead-letter stream:"), "{view}: {page}");
    }
    let pressed = env.command(&["sleep", "300"]);
    client.start_run(&pressed).await.expect("submit");
    env.wait_state(&client, &pressed.run_id, RunState::Running)
        .await;
    let button = operator
        .post(format!("{url}/console/runs/{}/stop", pressed.run_id))
        .header("authorization", format!("Bearer {OPERATOR_KEY}"))
        .send()
        .await
        .expect("stop button");
    assert!(button.status().is_success(), "{}", button.status());
    let stopped = env.wait_terminal(&client, &pressed.run_id, LIMIT).await;
    assert_eq!(stopped.state(), RunState::Stopped, "{}", stopped.reason);
    assert_eq!(stopped.stop_requested_by, "console:operator");

    // A kept run idle past its window is paused by the reaper (a session
    // command) and stopped by the platform between turns.
    let mut kept = env.kept(&["true"]);
    kept.spec.as_mut().expect("spec").idle_pause_secs = 1;
    client.start_run(&kept).await.expect("submit kept");
    idle_after(&client, &kept.run_id, 1).await;
    released(&client, &kept.run_id, RunState::Paused).await;
    stop_run(&client, &kept.run_id, "secure stop between turns").await;
    let ended = env.wait_terminal(&client, &kept.run_id, LIMIT).await;
    assert_eq!(ended.state(), RunState::Stopped, "{}", ended.reason);

    // The analytics reader reads events and may publish no command.
    let analytics = corral_client::Client::connect_with(
        &nats.url(),
        &auth_of(&generated, Role::Analytics),
        &env.prefix,
        "analytics",
    )
    .await
    .expect("analytics connects");
    let seen = analytics
        .get(&command.run_id)
        .await
        .expect_err("analytics may not ask the tracker");
    assert!(seen.is_transient(), "refused as no answer: {seen}");
    let forged = env.command(&["sh", "-c", "echo forged"]);
    let publish = analytics.publish_run(&forged).await;
    assert!(publish.is_err(), "a command from analytics is not taken");
    let spawner_credential = corral_client::Client::connect_with(
        &nats.url(),
        &auth_of(&generated, Role::Spawner),
        &env.prefix,
        "not-a-platform",
    )
    .await
    .expect("connects");
    let stop = corral_proto::v1::StopCommand {
        run_id: command.run_id.clone(),
        reason: "forged".into(),
        requested_by: "spawner".into(),
        requested_at_ms: corral_common::now_ms(),
    };
    assert!(
        spawner_credential.stop(&stop).await.is_err(),
        "a spawner may not ask the tracker to stop runs"
    );
    let log = eventually("the server logs the refused publishes", LIMIT, || async {
        let log = nats.log();
        (violations(&log).len() >= 3).then_some(log)
    })
    .await;
    let refused: Vec<&str> = violations(&log);
    let expected = [
        format!("Subject \"{}\"", env.subjects.cmd_run()),
        format!("Subject \"{}\"", env.subjects.tracker("get")),
        format!("Subject \"{}\"", env.subjects.tracker("stop")),
    ];
    for line in &refused {
        assert!(
            expected.iter().any(|e| line.contains(e.as_str())),
            "a service used a subject its role may not: {line}"
        );
    }
    for e in &expected {
        assert!(
            refused.iter().any(|line| line.contains(e.as_str())),
            "the server refused {e}: {refused:#?}"
        );
    }
    let forged_run = client.get(&forged.run_id).await;
    assert!(forged_run.is_err(), "the forged run was never recorded");

    ingest.stop().await;
    reaper.stop().await;
    spawner.stop().await;
    tracker.stop().await;
    let log = nats.log();
    let after: Vec<&str> = violations(&log)
        .into_iter()
        .filter(|line| !expected.iter().any(|e| line.contains(e.as_str())))
        .collect();
    assert!(
        after.is_empty(),
        "no service was refused a subject: {after:#?}"
    );
    env.cleanup().await;
}

/// Runs `openssl` with `args` in `dir`; panics with its output on failure.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on PATH (Debian package openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn certificates(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=corral-test-ca",
        ],
    );
    for (name, extension) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), extension).expect("extension file");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=corral-test-{name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_is_required_when_the_server_asks_for_it() {
    let env = TestEnv::new().await;
    let dir = env.home.join("tls");
    std::fs::create_dir_all(&dir).expect("tls dir");
    certificates(&dir);
    let path = |name: &str| dir.join(name);
    let nats = PrivateNats::start_with_config(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 5 }}",
        path("server.pem").display(),
        path("server-key.pem").display(),
        path("ca.pem").display(),
    ));
    let connect = |auth: NatsAuth| {
        let url = nats.url();
        let prefix = env.prefix.clone();
        async move { corral_client::Client::connect_with(&url, &auth, &prefix, "tls-test").await }
    };

    let plain = connect(NatsAuth::default()).await;
    assert!(plain.is_err(), "a client without TLS is refused");
    let no_certificate = connect(NatsAuth {
        tls_ca: Some(path("ca.pem")),
        ..Default::default()
    })
    .await;
    assert!(
        no_certificate.is_err(),
        "a client without a certificate is refused when the server verifies"
    );
    let client = connect(NatsAuth {
        tls_ca: Some(path("ca.pem")),
        tls_cert: Some(path("client.pem")),
        tls_key: Some(path("client-key.pem")),
        ..Default::default()
    })
    .await
    .expect("a client with the CA and its certificate connects");
    // The connection carries JetStream calls: the streams are provisioned.
    corral_common::nats::ensure_streams(client.jetstream(), &env.subjects)
        .await
        .expect("JetStream over mutual TLS");
    drop(client);
    env.cleanup().await;
}
