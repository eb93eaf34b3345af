//! `corral dlq`: the dead letters, listed, shown and replayed. A dead letter
//! is a message a service could not decode or apply, copied to
//! `<prefix>.dlq.<kind>` (stream `<PREFIX>_DLQ`, kept 30 days) with why
//! (`Corral-Error`), where it was first published
//! (`Corral-Original-Subject`) and its original headers.

use std::process::ExitCode;

use anyhow::{Context, bail};
use async_nats::jetstream::{self, message::StreamMessage};
use corral_proto::headers;
use corral_proto::v1::{
    AgentEvent, ContinueCommand, LifecycleEvent, RunCommand, SessionCommand, StopCommand,
};
use prost::Message;
use serde_json::json;

use crate::commands::Global;

#[derive(clap::Subcommand)]
pub enum Dlq {
    /// List dead letters, oldest first: sequence, time, kind, original subject, error.
    Ls(LsArgs),
    /// Show one dead letter: its error, original subject, headers and decoded payload.
    Show(ShowArgs),
    /// Publish dead letters again on their original subject with their original headers, and
    /// remove them from the dead letters once the stream has them.
    Replay(ReplayArgs),
}

#[derive(clap::Args)]
pub struct LsArgs {
    /// Only dead letters of this kind: `cmd` (commands), `events` (agent
    /// events), `webhook` (transitions an endpoint never took) or `genai`
    /// (traces the collector refused).
    #[arg(long, value_parser = ["cmd", "events", "webhook", "genai"])]
    kind: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// The dead letter's sequence (the first column of `corral dlq ls`).
    seq: u64,
}

#[derive(clap::Args)]
#[command(
    after_help = "Example, once the cause is fixed (a tracker that was away too long, a \
spawner without the provider a run asked for):\n  corral dlq ls\n  corral dlq replay 12\n  corral dlq replay --all --kind cmd"
)]
pub struct ReplayArgs {
    /// The dead letter's sequence.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    seq: Option<u64>,
    /// Every dead letter (of `--kind`, when given).
    #[arg(long)]
    all: bool,
    /// With --all: only dead letters of this kind.
    #[arg(long, value_parser = ["cmd", "events"], requires = "all")]
    kind: Option<String>,
}

pub async fn dlq(global: &Global, command: Dlq) -> anyhow::Result<ExitCode> {
    let client = global.client().await?;
    let js = client.jetstream().clone();
    let subjects = client.subjects().clone();
    let stream_name = subjects.dlq_stream();
    let mut stream = js
        .get_stream(&stream_name)
        .await
        .with_context(|| format!("no dead-letter stream {stream_name} (start a service first)"))?;
    match command {
        Dlq::Ls(args) => {
            let letters = read(&mut stream, args.kind.as_deref(), &subjects, args.limit).await?;
            if global.json {
                for letter in &letters {
                    println!("{}", summary(letter, &subjects));
                }
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>6}  {:<24}  {:<6}  {:<40}  ERROR",
                    "SEQ", "TIME", "KIND", "SUBJECT"
                );
                for letter in &letters {
                    let s = summary(letter, &subjects);
                    println!(
                        "{:>6}  {:<24}  {:<6}  {:<40}  {}",
                        s["seq"],
                        s["time"].as_str().unwrap_or_default(),
                        s["kind"].as_str().unwrap_or_default(),
                        s["original_subject"].as_str().unwrap_or_default(),
                        s["error"].as_str().unwrap_or_default(),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Dlq::Show(args) => {
            let letter = stream
                .get_raw_message(args.seq)
                .await
                .with_context(|| format!("no dead letter {}", args.seq))?;
            let mut shown = summary(&letter, &subjects);
            let mut all = serde_json::Map::new();
            for (name, values) in letter.headers.iter() {
                let name: &str = name.as_ref();
                let values: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
                all.insert(name.to_owned(), json!(values.join(", ")));
            }
            shown["headers"] = all.into();
            shown["payload"] = decoded(&original_subject(&letter), &letter.payload).into();
            if global.json {
                println!("{shown}");
            } else {
                for (key, value) in shown.as_object().into_iter().flatten() {
                    match value {
                        serde_json::Value::String(text) => println!("{key:<17} {text}"),
                        other => println!("{key:<17} {other}"),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Dlq::Replay(args) => {
            let letters = match args.seq {
                Some(seq) => vec![
                    stream
                        .get_raw_message(seq)
                        .await
                        .with_context(|| format!("no dead letter {seq}"))?,
                ],
                None => read(&mut stream, args.kind.as_deref(), &subjects, usize::MAX).await?,
            };
            if letters.is_empty() {
                println!("no dead letters to replay");
            }
            for letter in letters {
                replay(&js, &stream, &letter).await?;
                println!(
                    "replayed {} to {}",
                    letter.sequence,
                    original_subject(&letter)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Dead letters of `kind` (every kind when `None`), oldest first, at most `limit`.
async fn read(
    stream: &mut jetstream::stream::Stream,
    kind: Option<&str>,
    subjects: &corral_proto::Subjects,
    limit: usize,
) -> anyhow::Result<Vec<StreamMessage>> {
    let info = stream
        .info()
        .await
        .context("dead-letter stream info")?
        .clone();
    let mut letters = Vec::new();
    if info.state.messages == 0 {
        return Ok(letters);
    }
    let wanted = kind.map(|k| subjects.dlq(k));
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if letters.len() >= limit {
            break;
        }
        // Deleted (replayed) sequences are gaps.
        let Ok(letter) = stream.get_raw_message(seq).await else {
            continue;
        };
        if wanted
            .as_deref()
            .is_none_or(|w| letter.subject.as_str() == w)
        {
            letters.push(letter);
        }
    }
    Ok(letters)
}

fn header(letter: &StreamMessage, name: &str) -> String {
    letter
        .headers
        .get(name)
        .map(|v| v.to_string())
        .unwrap_or_default()
}

fn original_subject(letter: &StreamMessage) -> String {
    header(letter, headers::DLQ_ORIGINAL_SUBJECT)
}

fn summary(letter: &StreamMessage, subjects: &corral_proto::Subjects) -> serde_json::Value {
    let kind = letter
        .subject
        .as_str()
        .strip_prefix(subjects.dlq("").as_str())
        .unwrap_or_default();
    json!({
        "seq": letter.sequence,
        "time": letter.time.to_string(),
        "kind": kind,
        "original_subject": original_subject(letter),
        "error": header(letter, headers::DLQ_ERROR),
        "deliveries": header(letter, headers::DLQ_DELIVERIES),
    })
}

/// The payload decoded as the message its original subject carries, or
/// its bytes (escaped) when it does not decode.
fn decoded(subject: &str, payload: &[u8]) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    let what = match parts.get(1..3) {
        Some(["cmd", "run"]) => RunCommand::decode(payload).map(|m| format!("{m:#?}")),
        Some(["cmd", "continue"]) => ContinueCommand::decode(payload).map(|m| format!("{m:#?}")),
        Some(["cmd", "session"]) => SessionCommand::decode(payload).map(|m| format!("{m:#?}")),
        Some(["cmd", "stop"]) => StopCommand::decode(payload).map(|m| format!("{m:#?}")),
        Some(["events", _]) => AgentEvent::decode(payload).map(|m| format!("{m:#?}")),
        // Webhook and trace letters: the transition they were about.
        Some(["lifecycle", _]) => LifecycleEvent::decode(payload).map(|m| format!("{m:#?}")),
        _ => return format!("{} bytes: {}", payload.len(), escaped(payload)),
    };
    what.unwrap_or_else(|err| {
        format!(
            "does not decode ({err}); {} bytes: {}",
            payload.len(),
            escaped(payload)
        )
    })
}

fn escaped(payload: &[u8]) -> String {
    let shown: String = payload
        .iter()
        .take(512)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if payload.len() > 512 {
        format!("{shown}...")
    } else {
        shown
    }
}

/// Publishes the letter on its original subject with its original headers
/// (the `Corral-*` ones dropped, a message id derived from the original's),
/// awaits the stream's acknowledgement, then deletes the letter.
async fn replay(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    letter: &StreamMessage,
) -> anyhow::Result<()> {
    let subject = original_subject(letter);
    if subject.is_empty() {
        bail!("dead letter {} has no original subject", letter.sequence);
    }
    let mut original = async_nats::HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name: &str = name.as_ref();
        if name == headers::DLQ_ORIGINAL_MSG_ID {
            // A new id per letter: the original's may still be in the
            // stream's de-duplication window (which would drop the replay),
            // and replaying the same letter twice must not publish twice.
            for value in values {
                let id = format!("{}-replay-{}", value.as_str(), letter.sequence);
                original.insert(headers::MSG_ID, id.as_str());
            }
            continue;
        }
        if name.starts_with("Corral-") {
            continue;
        }
        for value in values {
            original.append(name, value.as_str());
        }
    }
    js.publish_with_headers(subject.clone(), original, letter.payload.clone())
        .await
        .with_context(|| format!("publishing to {subject}"))?
        .await
        .with_context(|| format!("the stream did not take the replay on {subject}"))?;
    stream
        .delete_message(letter.sequence)
        .await
        .with_context(|| format!("removing dead letter {}", letter.sequence))?;
    Ok(())
}
