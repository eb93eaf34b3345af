//! Connect protocol framing, shared by anything that speaks Connect (E2B's
//! envd, so far): the envelopes of a streaming RPC (a flags byte, a
//! big-endian u32 length, the JSON message), written with [`envelope`] and
//! read off a response with [`Envelopes`], and the end-stream message with
//! its [`ConnectError`]. What the messages mean is the caller's business.
//!
//! Moved here from the E2B provider as it was: its errors still read
//! `e2b exec: ...`, and [`ConnectError::into_provider_error`] still knows
//! envd's error for a program it cannot start.

use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::Deserialize;

use crate::ProviderError;
use crate::remote;

/// Larger Connect envelopes are refused rather than buffered.
const MAX_ENVELOPE: usize = 16 * 1024 * 1024;
const END_STREAM_FLAG: u8 = 0x02;
const COMPRESSED_FLAG: u8 = 0x01;

/// One Connect envelope: a flags byte, the length (big-endian u32), the JSON.
pub(crate) fn envelope(flags: u8, message: &serde_json::Value) -> Bytes {
    let json = serde_json::to_vec(message).expect("a json value should serialize");
    let mut frame = BytesMut::with_capacity(5 + json.len());
    frame.extend_from_slice(&[flags]);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    frame.freeze()
}

pub(crate) struct Envelope {
    pub(crate) end_stream: bool,
    pub(crate) data: Bytes,
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Reads Connect envelopes off a streaming response.
pub(crate) struct Envelopes {
    body: ByteStream,
    buf: BytesMut,
    /// A body silent for this long is dead.
    idle: Duration,
}

impl Envelopes {
    pub(crate) fn new(response: reqwest::Response, idle: Duration) -> Envelopes {
        Envelopes {
            body: Box::pin(response.bytes_stream()),
            buf: BytesMut::new(),
            idle,
        }
    }

    /// The next envelope; `None` at a clean end of the body.
    pub(crate) async fn next(&mut self) -> Result<Option<Envelope>, ProviderError> {
        loop {
            if let Some(envelope) = self.take()? {
                return Ok(Some(envelope));
            }
            let chunk = tokio::time::timeout(self.idle, self.body.next())
                .await
                .map_err(|_| {
                    ProviderError::Transient(format!("e2b exec: envd silent for {:?}", self.idle))
                })?;
            match chunk {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(err)) => {
                    return Err(ProviderError::Transient(format!(
                        "e2b exec: stream broke: {}",
                        remote::error_chain(&err)
                    )));
                }
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(ProviderError::Transient(
                        "e2b exec: stream ended inside an envelope".into(),
                    ));
                }
            }
        }
    }

    fn take(&mut self) -> Result<Option<Envelope>, ProviderError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_ENVELOPE || flags & COMPRESSED_FLAG != 0 {
            return Err(ProviderError::Failed(format!(
                "e2b exec: unexpected envelope (flags {flags:#x}, {len} bytes)"
            )));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let data = self.buf.split_to(len).freeze();
        Ok(Some(Envelope {
            end_stream: flags & END_STREAM_FLAG != 0,
            data,
        }))
    }
}

#[derive(Deserialize)]
pub(crate) struct EndStream {
    #[serde(default)]
    pub(crate) error: Option<ConnectError>,
}

#[derive(Deserialize)]
pub(crate) struct ConnectError {
    #[serde(default)]
    pub(crate) code: String,
    #[serde(default)]
    message: String,
}

impl ConnectError {
    pub(crate) fn into_provider_error(self, what: &str) -> ProviderError {
        let message = format!("e2b {what}: {}: {}", self.code, self.message);
        // envd reports a program it cannot start as Go's exec error.
        let cannot_start = self.message.contains("executable file not found")
            || self.message.contains("no such file or directory");
        match self.code.as_str() {
            "invalid_argument" | "not_found" | "failed_precondition" | "out_of_range" => {
                ProviderError::Invalid(message)
            }
            _ if cannot_start => ProviderError::Invalid(message),
            "unavailable" | "resource_exhausted" | "deadline_exceeded" | "aborted" => {
                ProviderError::Transient(message)
            }
            _ => ProviderError::Failed(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn envelopes_frame_their_length_big_endian() {
        let frame = envelope(END_STREAM_FLAG, &json!({}));
        assert_eq!(&frame[..], &[2, 0, 0, 0, 2, b'{', b'}']);
    }

    #[test]
    fn a_program_envd_cannot_start_is_an_invalid_request() {
        let err = ConnectError {
            code: "internal".into(),
            message: "exec: \"nope\": executable file not found in $PATH".into(),
        };
        assert!(matches!(
            err.into_provider_error("exec"),
            ProviderError::Invalid(_)
        ));
    }
}
