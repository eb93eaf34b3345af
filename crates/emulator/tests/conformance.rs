//! Every request the E2B and Daytona clients send, and every answer the
//! emulators give, checked against the services' published contracts:
//! E2B's `spec/openapi.yml` and envd's `process.proto` (vendored under
//! `fixtures/e2b`, Apache-2.0), and a hand-written description of the
//! Daytona operations corral calls (`fixtures/daytona`, written from tag
//! `v0.190.0`; Daytona is AGPL-3.0, so nothing is copied).
//!
//! Each test drives one client through everything it does (create, list
//! across pages, run commands with output, signal, pause, resume, probe,
//! kill, and the calls on a sandbox that is gone), records the traffic at
//! the emulator, and fails naming each exchange that the contract does not
//! allow: an unknown path or operation, a query parameter the operation
//! does not take, a body that does not match its schema (objects are
//! closed: a property the contract does not name is refused), or a status
//! the operation does not answer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_emulator::{DaytonaEmulator, E2bEmulator, Exchange};
use corral_provider::{
    CreateSpec, DaytonaConfig, DaytonaProvider, E2bConfig, E2bProvider, ExecSpec, LABEL_DEPLOYMENT,
    LABEL_RUN_ID, Labels, Provider,
};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// An OpenAPI 3.0 document made checkable as JSON Schema 2020-12:
/// `nullable` becomes a choice with null, and every object schema that names
/// its properties refuses others.
struct Contract {
    name: &'static str,
    doc: Value,
}

impl Contract {
    fn load(name: &'static str, path: &Path) -> Contract {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let mut doc: Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).expect("contract json")
        } else {
            serde_yaml::from_str(&text).expect("contract yaml")
        };
        for section in ["schemas", "responses", "parameters"] {
            if let Some(part) = doc.pointer_mut(&format!("/components/{section}")) {
                to_json_schema(part);
            }
        }
        if let Some(paths) = doc.get_mut("paths") {
            to_json_schema(paths);
        }
        Contract { name, doc }
    }

    /// The path template matching `path`, and its operation for `method`.
    fn operation(&self, method: &str, path: &str) -> Option<(String, &Value)> {
        let paths = self.doc.get("paths")?.as_object()?;
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let template = paths.keys().find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(&segments)
                    .all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
        })?;
        let operation = paths.get(template)?.get(method.to_ascii_lowercase())?;
        Some((template.clone(), operation))
    }

    /// Follows a `$ref` inside the document (responses and parameters).
    fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(pointer) => self
                .doc
                .pointer(pointer.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{}: dangling $ref {pointer}", self.name)),
            None => value,
        }
    }

    /// Checks `instance` against the schema at `pointer` in the document.
    fn check(&self, pointer: &str, instance: &Value) -> Result<(), String> {
        let mut root = self.doc.clone();
        // A JSON pointer in a URI fragment: braces are not URI characters.
        let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
        root["$ref"] = Value::String(format!("#{fragment}"));
        let validator = jsonschema::draft202012::new(&root)
            .map_err(|err| format!("schema at {pointer} does not compile: {err}"))?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|err| format!("{err} (at {})", err.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Escapes a path segment for a JSON pointer.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn to_json_schema(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for child in map.values_mut() {
                to_json_schema(child);
            }
            if map.contains_key("properties")
                && map.get("type").and_then(Value::as_str) == Some("object")
                && !map.contains_key("additionalProperties")
            {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                let rest = Value::Object(std::mem::take(map));
                map.insert("anyOf".into(), json!([rest, { "type": "null" }]));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(to_json_schema),
        _ => {}
    }
}

/// What an exchange broke of the contract; `operations` gathers the
/// operation ids seen.
fn check_rest(
    contract: &Contract,
    exchange: &Exchange,
    path: &str,
    operations: &mut BTreeSet<String>,
) -> Vec<String> {
    let said = format!(
        "{} {} {}{} -> {}",
        contract.name,
        exchange.method,
        path,
        exchange
            .query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default(),
        exchange.status
    );
    let Some((template, operation)) = contract.operation(&exchange.method, path) else {
        return vec![format!("{said}: no such operation")];
    };
    let mut problems = Vec::new();
    if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
        operations.insert(id.to_owned());
    }
    let pointer = format!(
        "/paths/{}/{}",
        escape(&template),
        exchange.method.to_ascii_lowercase()
    );
    // Query parameters: only those the operation takes.
    let taken: BTreeSet<String> = operation
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| contract.resolve(p))
        .filter(|p| p.get("in").and_then(Value::as_str) == Some("query"))
        .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    if let Some(query) = &exchange.query {
        for (name, _) in form_urlencoded::parse(query.as_bytes()) {
            if !taken.contains(name.as_ref()) {
                problems.push(format!("{said}: query parameter {name:?} is not taken"));
            }
        }
    }
    // The request body.
    if !exchange.request_body.is_empty() {
        match serde_json::from_slice::<Value>(&exchange.request_body) {
            Err(err) => problems.push(format!("{said}: request body is not JSON: {err}")),
            Ok(body) => match operation.pointer("/requestBody/content/application~1json/schema") {
                None => problems.push(format!("{said}: the operation takes no JSON body")),
                Some(_) => {
                    let schema = format!("{pointer}/requestBody/content/application~1json/schema");
                    if let Err(err) = contract.check(&schema, &body) {
                        problems.push(format!("{said}: request {body}: {err}"));
                    }
                }
            },
        }
    }
    // The answer.
    let status = exchange.status.to_string();
    let Some(response) = operation
        .pointer(&format!("/responses/{status}"))
        .or_else(|| operation.pointer("/responses/default"))
    else {
        problems.push(format!(
            "{said}: status {status} is not an answer of the operation"
        ));
        return problems;
    };
    let response = contract.resolve(response);
    let content_type = exchange
        .response_content_type
        .as_deref()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let content = response.get("content").and_then(Value::as_object);
    match content {
        None if exchange.response_body.is_empty() => {}
        None => problems.push(format!(
            "{said}: the answer has no body in the contract, the emulator sent {:?}",
            String::from_utf8_lossy(&exchange.response_body)
        )),
        Some(content) => match content.get(&content_type) {
            None => problems.push(format!(
                "{said}: content type {content_type:?} is not among {:?}",
                content.keys().collect::<Vec<_>>()
            )),
            Some(media) if content_type == "application/json" && media.get("schema").is_some() => {
                match serde_json::from_slice::<Value>(&exchange.response_body) {
                    Err(err) => problems.push(format!("{said}: answer is not JSON: {err}")),
                    Ok(body) => {
                        // Where the schema is: in the operation, or in the
                        // shared response it refers to.
                        let schema = match operation
                            .pointer(&format!("/responses/{status}/$ref"))
                            .or_else(|| operation.pointer("/responses/default/$ref"))
                            .and_then(Value::as_str)
                        {
                            Some(shared) => format!(
                                "{}/content/application~1json/schema",
                                shared.trim_start_matches('#')
                            ),
                            None => format!(
                                "{pointer}/responses/{status}/content/application~1json/schema"
                            ),
                        };
                        if let Err(err) = contract.check(&schema, &body) {
                            problems.push(format!("{said}: answer {body}: {err}"));
                        }
                    }
                }
            }
            Some(_) => {}
        },
    }
    problems
}

/// envd's Connect service: bodies against `process.proto`.
struct Envd {
    pool: DescriptorPool,
}

impl Envd {
    fn load() -> Envd {
        let dir = fixtures().join("e2b");
        let files = protox::compile(["process.proto"], [&dir]).expect("process.proto compiles");
        let pool = DescriptorPool::from_file_descriptor_set(files).expect("descriptor pool");
        Envd { pool }
    }

    fn message(&self, name: &str) -> MessageDescriptor {
        self.pool
            .get_message_by_name(&format!("process.{name}"))
            .unwrap_or_else(|| panic!("process.{name} is not in process.proto"))
    }

    /// Decodes `json` as `message`, refusing unknown fields and wrong types.
    fn decode(&self, message: &str, json: &[u8]) -> Result<(), String> {
        let mut deserializer = serde_json::Deserializer::from_slice(json);
        DynamicMessage::deserialize(self.message(message), &mut deserializer)
            .map(|_| ())
            .map_err(|err| {
                format!(
                    "not a process.{message}: {err}: {}",
                    String::from_utf8_lossy(json)
                )
            })
    }

    /// The Connect envelopes of a streamed body: (flags, JSON).
    fn envelopes(body: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
        let mut rest = body;
        let mut out = Vec::new();
        while !rest.is_empty() {
            if rest.len() < 5 {
                return Err(format!(
                    "{} stray bytes after the last envelope",
                    rest.len()
                ));
            }
            let len = u32::from_be_bytes(rest[1..5].try_into().expect("four bytes")) as usize;
            let data = rest
                .get(5..5 + len)
                .ok_or_else(|| "an envelope is cut short".to_owned())?;
            out.push((rest[0], data.to_vec()));
            rest = &rest[5 + len..];
        }
        Ok(out)
    }

    /// A Connect error body, or the end-of-stream message.
    fn check_connect_error(value: &Value) -> Result<(), String> {
        const CODES: [&str; 16] = [
            "canceled",
            "unknown",
            "invalid_argument",
            "deadline_exceeded",
            "not_found",
            "already_exists",
            "permission_denied",
            "resource_exhausted",
            "failed_precondition",
            "aborted",
            "out_of_range",
            "unimplemented",
            "internal",
            "unavailable",
            "data_loss",
            "unauthenticated",
        ];
        match value.get("code").and_then(Value::as_str) {
            Some(code) if CODES.contains(&code) => Ok(()),
            _ => Err(format!("not a Connect error: {value}")),
        }
    }

    fn check(&self, exchange: &Exchange, rpc: &str, rpcs: &mut BTreeSet<String>) -> Vec<String> {
        let said = format!("envd {rpc} -> {}", exchange.status);
        let mut problems = Vec::new();
        rpcs.insert(rpc.to_owned());
        let (request, response) = match rpc {
            "Start" => ("StartRequest", "StartResponse"),
            "SendSignal" => ("SendSignalRequest", "SendSignalResponse"),
            other => return vec![format!("{said}: corral calls no {other}")],
        };
        // The request: one envelope for a streaming RPC, plain JSON for a
        // unary one.
        let body = if rpc == "Start" {
            match Envd::envelopes(&exchange.request_body) {
                Ok(envelopes) if envelopes.len() == 1 => envelopes[0].1.clone(),
                Ok(envelopes) => {
                    return vec![format!("{said}: {} request envelopes", envelopes.len())];
                }
                Err(err) => return vec![format!("{said}: request: {err}")],
            }
        } else {
            exchange.request_body.to_vec()
        };
        if let Err(err) = self.decode(request, &body) {
            problems.push(format!("{said}: request {err}"));
        }
        let body = &exchange.response_body;
        if exchange.status == 502 {
            // E2B's client proxy, not envd: a sandbox that is gone.
            let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            if value.get("message").and_then(Value::as_str) != Some("The sandbox was not found") {
                problems.push(format!("{said}: not the proxy's not-found body: {value}"));
            }
            return problems;
        }
        if exchange.status != 200 {
            let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            if let Err(err) = Envd::check_connect_error(&value) {
                problems.push(format!("{said}: {err}"));
            }
            return problems;
        }
        if rpc == "Start" {
            match Envd::envelopes(body) {
                Err(err) => problems.push(format!("{said}: answer: {err}")),
                Ok(envelopes) => {
                    for (flags, data) in envelopes {
                        if flags & 0x02 != 0 {
                            // End of stream: `{}` or `{"error": ...}`.
                            let value: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
                            let fine = match value.get("error") {
                                Some(error) => Envd::check_connect_error(error),
                                None if value.is_object() => Ok(()),
                                None => Err(format!("end of stream is not an object: {value}")),
                            };
                            if let Err(err) = fine {
                                problems.push(format!("{said}: {err}"));
                            }
                        } else if let Err(err) = self.decode(response, &data) {
                            problems.push(format!("{said}: answer {err}"));
                        }
                    }
                }
            }
        } else if let Err(err) = self.decode(response, body) {
            problems.push(format!("{said}: answer {err}"));
        }
        problems
    }
}

fn labels(run_id: &str) -> Labels {
    Labels::from([
        (LABEL_RUN_ID.to_owned(), run_id.to_owned()),
        (LABEL_DEPLOYMENT.to_owned(), "conformance".to_owned()),
    ])
}

fn spec(run_id: &str) -> CreateSpec {
    CreateSpec {
        run_id: run_id.into(),
        labels: labels(run_id),
        ..CreateSpec::default()
    }
}

fn argv(args: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: args.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
    }
}

/// Runs a command to its end, reading all its output.
async fn run(provider: &dyn Provider, id: &str, args: &[&str]) {
    let mut exec = provider.exec(id, &argv(args)).await.expect("exec");
    while exec.output.recv().await.is_some() {}
    tokio::time::timeout(Duration::from_secs(10), exec.process.wait())
        .await
        .expect("the command never ended");
}

/// Everything a provider does, in the order a run's life does it.
async fn drive(provider: &dyn Provider) {
    let first = provider.create(&spec("c1")).await.expect("create");
    let second = provider.create(&spec("c2")).await.expect("create");
    let deployment = Labels::from([(LABEL_DEPLOYMENT.to_owned(), "conformance".to_owned())]);
    let listed = provider.list(&deployment).await.expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    run(
        provider,
        &first.id,
        &["sh", "-c", "echo \"$GREETING\"; echo oops >&2; exit 3"],
    )
    .await;
    run(provider, &first.id, &["no-such-program-3107"]).await;
    let mut exec = provider
        .exec(
            &first.id,
            &argv(&["sh", "-c", "trap '' TERM; echo ready; sleep 30"]),
        )
        .await
        .expect("exec");
    assert!(exec.output.recv().await.is_some());
    tokio::time::timeout(
        Duration::from_secs(10),
        exec.process.terminate(Duration::from_millis(500)),
    )
    .await
    .expect("terminate never ended");
    provider.pause(&first.id).await.expect("pause");
    provider.pause(&first.id).await.expect("pause again");
    provider.resume(&first.id).await.expect("resume");
    run(provider, &first.id, &["true"]).await;
    provider.probe(&first.id).await.expect("probe");
    provider.kill(&first.id).await.expect("kill");
    provider.kill(&first.id).await.expect("kill again");
    assert!(provider.exec(&first.id, &argv(&["true"])).await.is_err());
    provider
        .probe(&first.id)
        .await
        .expect("probe a gone sandbox");
    provider.kill(&second.id).await.expect("kill");
}

fn report(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} exchange(s) break the contract:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test]
async fn the_e2b_client_and_emulator_keep_to_e2bs_spec() {
    let home = tempfile::tempdir().expect("temp home");
    let emulator = E2bEmulator::start(home.path()).await.expect("emulator");
    emulator.set_page_size(1);
    let provider = E2bProvider::new(E2bConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        envd_url: emulator.envd_url(),
        ..E2bConfig::default()
    })
    .expect("provider");
    emulator.recorder().start();
    drive(&provider).await;
    provider
        .set_timeout("gone-3107", 60)
        .await
        .expect_err("gone");

    let api = Contract::load("e2b", &fixtures().join("e2b/openapi.yml"));
    let envd = Envd::load();
    let mut problems = Vec::new();
    let mut operations = BTreeSet::new();
    let mut rpcs = BTreeSet::new();
    let exchanges = emulator.recorder().exchanges();
    for exchange in &exchanges {
        match exchange.path.strip_prefix("/envd/") {
            Some(rest) => {
                let rpc = rest.rsplit('/').next().unwrap_or_default();
                problems.extend(envd.check(exchange, rpc, &mut rpcs));
            }
            None => problems.extend(check_rest(&api, exchange, &exchange.path, &mut operations)),
        }
    }
    report(problems);
    // Not vacuous: every call the provider makes was seen and checked.
    for (method, path) in [
        ("post", "/sandboxes"),
        ("get", "/v2/sandboxes"),
        ("get", "/sandboxes/{sandboxID}"),
        ("delete", "/sandboxes/{sandboxID}"),
        ("post", "/sandboxes/{sandboxID}/pause"),
        ("post", "/sandboxes/{sandboxID}/connect"),
        ("post", "/sandboxes/{sandboxID}/timeout"),
    ] {
        let seen = exchanges.iter().any(|e| {
            e.method.eq_ignore_ascii_case(method)
                && api
                    .operation(&e.method, &e.path)
                    .is_some_and(|(template, _)| template == path)
        });
        assert!(seen, "no {method} {path} was made: {operations:?}");
    }
    assert_eq!(
        rpcs,
        BTreeSet::from(["SendSignal".to_owned(), "Start".to_owned()]),
        "envd calls checked"
    );
}

#[tokio::test]
async fn the_daytona_client_and_emulator_keep_to_daytonas_contract() {
    let home = tempfile::tempdir().expect("temp home");
    let emulator = DaytonaEmulator::start(home.path()).await.expect("emulator");
    emulator.set_page_size(1);
    let provider = DaytonaProvider::new(DaytonaConfig {
        api_url: emulator.url(),
        api_key: "test-key".into(),
        ..DaytonaConfig::default()
    })
    .expect("provider");
    emulator.recorder().start();
    drive(&provider).await;

    let api = Contract::load("daytona api", &fixtures().join("daytona/api.json"));
    let toolbox = Contract::load("daytona toolbox", &fixtures().join("daytona/toolbox.json"));
    let mut problems = Vec::new();
    let mut operations = BTreeSet::new();
    for exchange in emulator.recorder().exchanges() {
        // `{toolboxProxyUrl}/{sandboxId}/...`: the emulator's proxy URL is
        // `{url}/proxy/toolbox`.
        let toolbox_path = exchange
            .path
            .strip_prefix("/proxy/toolbox/")
            .and_then(|rest| rest.split_once('/'))
            .map(|(_, path)| format!("/{path}"));
        match toolbox_path {
            Some(path) => problems.extend(check_rest(&toolbox, &exchange, &path, &mut operations)),
            None => problems.extend(check_rest(&api, &exchange, &exchange.path, &mut operations)),
        }
    }
    report(problems);
    let expected = [
        "createSandbox",
        "listSandboxes",
        "getSandbox",
        "deleteSandbox",
        "stopSandbox",
        "startSandbox",
        "CreateSession",
        "DeleteSession",
        "SessionExecuteCommand",
        "GetSessionCommand",
        "GetSessionCommandLogs",
    ];
    for id in expected {
        assert!(
            operations.contains(id),
            "{id} was never called: {operations:?}"
        );
    }
}
