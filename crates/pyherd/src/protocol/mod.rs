//! The host ⇄ worker wire protocol (DESIGN §3): 4-byte big-endian length + JSON body.
//!
//! Host → worker: `call`, and `cancel` while a stream runs. Worker → host: `hello` (first
//! frame), `ok`, `err`, and for a streaming call `chunk`… then `end` (or `err`).
//! An `err` with id 0 before `hello` reports a start-up failure (a handler module that raised).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::codec::LengthDelimitedCodec;

use crate::error::Error;

mod readable;
pub(crate) use readable::unreadable;

/// The protocol version this host speaks; a worker announcing another is refused.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Bytes a call frame needs besides its command, arguments, session id and request id
/// (envelope, id, deadline, stream flag).
pub(crate) const CALL_ENVELOPE_BYTES: usize = 160;

/// The frame codec for both directions, refusing frames over `max_frame_bytes`.
pub(crate) fn codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// A call as written on the request pipe.
#[derive(Serialize)]
pub(crate) struct Call<'a> {
    pub(crate) t: &'static str,
    pub(crate) id: u64,
    /// The caller's request id (the handler's `ctx.request_id`).
    pub(crate) rid: &'a str,
    pub(crate) cmd: &'a str,
    pub(crate) args: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) session_id: Option<&'a str>,
    /// Wall-clock deadline, in milliseconds since the Unix epoch.
    pub(crate) deadline_ms: u64,
    /// The answer is streamed: `chunk` frames, then `end`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) stream: bool,
}

/// What a call frame carries besides its command and arguments.
pub(crate) struct CallMeta<'a> {
    pub(crate) id: u64,
    pub(crate) rid: &'a str,
    pub(crate) session_id: Option<&'a str>,
    pub(crate) deadline_ms: u64,
    pub(crate) stream: bool,
}

impl<'a> Call<'a> {
    pub(crate) fn new(cmd: &'a str, args: &'a RawValue, meta: CallMeta<'a>) -> Self {
        Self {
            t: "call",
            id: meta.id,
            rid: meta.rid,
            cmd,
            args,
            session_id: meta.session_id,
            deadline_ms: meta.deadline_ms,
            stream: meta.stream,
        }
    }
}

/// The frame asking a worker to stop streaming call `id`.
pub(crate) fn cancel_frame(id: u64) -> Vec<u8> {
    format!(r#"{{"t":"cancel","id":{id}}}"#).into_bytes()
}

/// The worker's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) pid: u32,
    pub(crate) handlers: Vec<String>,
    pub(crate) python: String,
    pub(crate) json: String,
    /// Adapters the worker's handler modules declared (e.g. `dspy`).
    pub(crate) adapters: Vec<String>,
}

/// Any frame a worker sends, flat (tag `t`), so that `result` can stay borrowed raw JSON.
#[derive(Deserialize)]
struct Incoming<'a> {
    t: &'a str,
    id: u64,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    category: Option<String>,
    kind: Option<String>,
    message: Option<String>,
    python_type: Option<String>,
    traceback: Option<String>,
    retryable: Option<bool>,
    protocol: Option<u32>,
    pid: Option<u32>,
    handlers: Option<Vec<String>>,
    python: Option<String>,
    json: Option<String>,
    adapters: Option<Vec<String>>,
}

/// A decoded worker frame.
#[derive(Debug)]
pub(crate) enum Message {
    Hello(Hello),
    Ok {
        id: u64,
        result: Box<RawValue>,
    },
    Err {
        id: u64,
        error: Error,
    },
    /// One chunk of a streaming call.
    Chunk {
        id: u64,
        data: Box<RawValue>,
    },
    /// A streaming call is over.
    End {
        id: u64,
    },
}

/// Decodes one frame body sent by a worker; the error says how it breaks the protocol.
pub(crate) fn decode(body: &[u8]) -> Result<Message, String> {
    let frame: Incoming<'_> = serde_json::from_slice(body).map_err(|e| {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        format!("worker sent a frame that is not a message ({e}): {shown:?}")
    })?;
    match frame.t {
        "ok" => {
            let result = match frame.result {
                Some(raw) => raw.to_owned(),
                None => null(),
            };
            Ok(Message::Ok {
                id: frame.id,
                result,
            })
        }
        "chunk" => Ok(Message::Chunk {
            id: frame.id,
            data: frame.data.map_or_else(null, ToOwned::to_owned),
        }),
        "end" => Ok(Message::End { id: frame.id }),
        "err" => {
            let error = Error::from_wire(
                frame.category.as_deref().unwrap_or("system"),
                frame.kind.as_deref().unwrap_or("unknown"),
                frame.message.unwrap_or_default(),
                frame.retryable,
            )
            .with_context(|c| {
                c.python_type = frame.python_type;
                c.traceback = frame.traceback;
            });
            Ok(Message::Err {
                id: frame.id,
                error,
            })
        }
        "hello" => {
            let version = frame.protocol.unwrap_or(0);
            if version != PROTOCOL_VERSION {
                return Err(format!(
                    "worker speaks protocol {version}, this host speaks {PROTOCOL_VERSION} \
                     (mismatched pyherd_worker package?)"
                ));
            }
            Ok(Message::Hello(Hello {
                pid: frame.pid.unwrap_or(0),
                handlers: frame.handlers.unwrap_or_default(),
                python: frame.python.unwrap_or_default(),
                json: frame.json.unwrap_or_default(),
                adapters: frame.adapters.unwrap_or_default(),
            }))
        }
        other => Err(format!("worker sent an unexpected message type {other:?}")),
    }
}

/// JSON `null` as an owned raw value.
pub(crate) fn null() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_frames_embed_raw_args() {
        let args = RawValue::from_string(r#"{"a":[1,2]}"#.into()).unwrap();
        let meta = |stream| CallMeta {
            id: 7,
            rid: "r7",
            session_id: None,
            deadline_ms: 99,
            stream,
        };
        let body = serde_json::to_string(&Call::new("echo", &args, meta(false))).unwrap();
        assert_eq!(
            body,
            r#"{"t":"call","id":7,"rid":"r7","cmd":"echo","args":{"a":[1,2]},"deadline_ms":99}"#
        );
        assert!(body.len() < CALL_ENVELOPE_BYTES);
        let body = serde_json::to_string(&Call::new("echo", &args, meta(true))).unwrap();
        assert!(
            body.ends_with(r#""deadline_ms":99,"stream":true}"#),
            "{body}"
        );
        assert_eq!(cancel_frame(7), br#"{"t":"cancel","id":7}"#);
    }

    #[test]
    fn chunks_and_ends_decode() {
        match decode(br#"{"t":"chunk","id":2,"data":[1,"a"]}"#).unwrap() {
            Message::Chunk { id, data } => assert_eq!((id, data.get()), (2, r#"[1,"a"]"#)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(br#"{"t":"end","id":2}"#).unwrap(),
            Message::End { id: 2 }
        ));
    }

    #[test]
    fn ok_err_and_hello_decode() {
        match decode(br#"{"t":"ok","id":3,"result":{"x":"\u00e9"}}"#).unwrap() {
            Message::Ok { id, result } => {
                assert_eq!(id, 3);
                assert_eq!(result.get(), r#"{"x":"\u00e9"}"#);
            }
            other => panic!("{other:?}"),
        }
        match decode(br#"{"t":"ok","id":4,"result":null}"#).unwrap() {
            Message::Ok { result, .. } => assert_eq!(result.get(), "null"),
            other => panic!("{other:?}"),
        }
        match decode(br#"{"t":"err","id":5,"category":"python","kind":"python_exception","message":"boom","python_type":"ValueError","traceback":"tb"}"#).unwrap() {
            Message::Err { id, error } => {
                assert_eq!(id, 5);
                assert_eq!(error.kind(), &crate::ErrorKind::PythonException);
                assert_eq!(error.context().python_type.as_deref(), Some("ValueError"));
            }
            other => panic!("{other:?}"),
        }
        match decode(br#"{"t":"hello","id":0,"protocol":1,"pid":7,"adapters":["dspy"]}"#).unwrap() {
            Message::Hello(h) => assert_eq!(h.adapters, ["dspy"]),
            other => panic!("{other:?}"),
        }
        match decode(br#"{"t":"hello","id":0,"protocol":1,"pid":42,"handlers":["ping"],"python":"3.11.7","json":"json"}"#).unwrap() {
            Message::Hello(h) => {
                assert_eq!((h.pid, h.handlers), (42, vec!["ping".to_owned()]));
                assert!(h.adapters.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_wrong_versions_are_refused() {
        for body in [
            &b"not json!!!!"[..],
            br#"{"t":"ok"}"#,
            br#"{"t":"bye","id":1}"#,
            br#"{"t":"hello","id":0,"protocol":2}"#,
        ] {
            let e = decode(body).unwrap_err();
            assert!(e.starts_with("worker "), "{body:?}: {e}");
        }
    }
}
