//! What the load tool puts on the wire and reads back: the `send` frame, the
//! message body that carries the send time, the `ref` that identifies a
//! send in its `ack`, and a fast reader for the server's events.
//!
//! Body: `<intended send time, unix ns> <phase> <sender> <k> xxxx…` padded
//! with `x` to the requested length. Ref: `<phase>.<k>.<intended unix ns>`.
//! Only ASCII digits, spaces and `x`: nothing JSON must escape.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;

/// The identity and send time of one message of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// When the schedule said to send it, unix nanoseconds.
    pub sent_ns: u64,
    /// The phase (a step in `max` mode) it belongs to.
    pub phase: u32,
    /// Index of the sending connection.
    pub sender: u32,
    /// The sender's message number within the phase.
    pub k: u32,
}

/// Appends the body of `stamp`, padded with `x` up to `len` bytes (a body
/// never gets shorter than its stamp).
pub fn write_body(out: &mut String, stamp: &Stamp, len: usize) {
    let start = out.len();
    let _ = write!(out, "{} {} {} {}", stamp.sent_ns, stamp.phase, stamp.sender, stamp.k);
    let written = out.len() - start;
    if written < len {
        out.push(' ');
        for _ in written + 1..len {
            out.push('x');
        }
    }
}

/// Reads the stamp at the start of a body; `None` for a body we did not write.
pub fn parse_body(body: &str) -> Option<Stamp> {
    let mut it = body.split(' ');
    let sent_ns = it.next()?.parse().ok()?;
    let phase = it.next()?.parse().ok()?;
    let sender = it.next()?.parse().ok()?;
    let k = it.next()?.parse().ok()?;
    Some(Stamp {
        sent_ns,
        phase,
        sender,
        k,
    })
}

/// The `ref` of a send: phase, message number and intended send time.
pub fn write_ref(out: &mut String, stamp: &Stamp) {
    let _ = write!(out, "{}.{}.{}", stamp.phase, stamp.k, stamp.sent_ns);
}

/// Reads a `ref` written by [`write_ref`]: (phase, k, sent_ns).
pub fn parse_ref(reference: &str) -> Option<(u32, u32, u64)> {
    let mut it = reference.split('.');
    let phase = it.next()?.parse().ok()?;
    let k = it.next()?.parse().ok()?;
    let sent_ns = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((phase, k, sent_ns))
}

/// The JSON `send` frame: `target` is `"to":"<user>"` or `"chat":"<chat>"`.
pub fn send_frame(target: &str, stamp: &Stamp, body_len: usize) -> String {
    let mut out = String::with_capacity(96 + body_len);
    out.push_str(r#"{"type":"send","#);
    out.push_str(target);
    out.push_str(r#","ref":""#);
    write_ref(&mut out, stamp);
    out.push_str(r#"","body":""#);
    write_body(&mut out, stamp, body_len);
    out.push_str(r#""}"#);
    out
}

/// The server events the load tool acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    Message {
        body: Cow<'a, str>,
    },
    Ack {
        reference: Option<Cow<'a, str>>,
    },
    Error {
        code: Cow<'a, str>,
        reference: Option<Cow<'a, str>>,
    },
    /// Any other event type (`joined`, `typing`, …).
    Other,
    /// Not a JSON object with a string `type`.
    Bad,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// Reads one text frame. The gateway writes `type` first, so a `message`
/// or `ack` is recognised without a full parse; anything else (or any
/// surprise, such as an escaped body) goes through serde.
pub fn parse_incoming(text: &str) -> Incoming<'_> {
    if let Some(rest) = text.strip_prefix(r#"{"type":"message","#) {
        if let Some(body) = string_field(rest, r#""body":""#) {
            return Incoming::Message {
                body: Cow::Borrowed(body),
            };
        }
    } else if let Some(rest) = text.strip_prefix(r#"{"type":"ack","#) {
        if let Some(reference) = string_field(rest, r#""ref":""#) {
            return Incoming::Ack {
                reference: Some(Cow::Borrowed(reference)),
            };
        }
    }
    match serde_json::from_str::<Wire>(text) {
        Ok(w) => match w.kind.as_ref() {
            "message" => match w.body {
                Some(body) => Incoming::Message { body },
                None => Incoming::Bad,
            },
            "ack" => Incoming::Ack { reference: w.reference },
            "error" => Incoming::Error {
                code: w.code.unwrap_or(Cow::Borrowed("unknown")),
                reference: w.reference,
            },
            _ => Incoming::Other,
        },
        Err(_) => Incoming::Bad,
    }
}

/// The value of a string field given its `"name":"` prefix, when it holds
/// no escape (else `None`, and the caller falls back to serde).
fn string_field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(prefix)? + prefix.len();
    let rest = &text[start..];
    let end = rest.find('"')?;
    let value = &rest[..end];
    if value.contains('\\') {
        return None;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        sent_ns: 1_732_550_000_123_456_789,
        phase: 3,
        sender: 41,
        k: 9_999,
    };

    #[test]
    fn body_roundtrips_and_is_padded_to_length() {
        let mut body = String::new();
        write_body(&mut body, &STAMP, 100);
        assert_eq!(body.len(), 100);
        assert!(body.starts_with("1732550000123456789 3 41 9999 x"));
        assert!(body.ends_with('x'));
        assert_eq!(parse_body(&body), Some(STAMP));
    }

    #[test]
    fn short_length_keeps_the_whole_stamp() {
        let mut body = String::new();
        write_body(&mut body, &STAMP, 4);
        assert_eq!(body, "1732550000123456789 3 41 9999");
        assert_eq!(parse_body(&body), Some(STAMP));
        // Exactly one byte of room: a space and no padding would exceed it.
        let mut exact = String::new();
        write_body(&mut exact, &STAMP, body.len() + 1);
        assert_eq!(exact.len(), body.len() + 1);
        assert_eq!(parse_body(&exact), Some(STAMP));
    }

    #[test]
    fn foreign_bodies_are_not_stamps() {
        assert_eq!(parse_body("hello"), None);
        assert_eq!(parse_body("1 2 3"), None);
        assert_eq!(parse_body(""), None);
        assert_eq!(parse_body("-1 2 3 4"), None);
    }

    #[test]
    fn ref_roundtrips() {
        let mut r = String::new();
        write_ref(&mut r, &STAMP);
        assert_eq!(r, "3.9999.1732550000123456789");
        assert_eq!(parse_ref(&r), Some((3, 9_999, STAMP.sent_ns)));
        assert_eq!(parse_ref("3.4"), None);
        assert_eq!(parse_ref("3.4.5.6"), None);
        assert_eq!(parse_ref("a.b.c"), None);
    }

    #[test]
    fn send_frame_is_a_valid_contract_send() {
        let frame = send_frame(r#""to":"6ba7b811-9dad-11d1-80b4-00c04fd430c8""#, &STAMP, 64);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "send");
        assert_eq!(v["to"], "6ba7b811-9dad-11d1-80b4-00c04fd430c8");
        assert_eq!(v["body"].as_str().unwrap().len(), 64);
        assert_eq!(parse_body(v["body"].as_str().unwrap()), Some(STAMP));
        assert_eq!(parse_ref(v["ref"].as_str().unwrap()), Some((3, 9_999, STAMP.sent_ns)));
    }

    #[test]
    fn incoming_fast_path_and_fallback_agree() {
        let fast = r#"{"type":"message","id":"a","chat":"b","seq":1,"from":"c","body":"1 2 3 4 xx","ts":5}"#;
        assert_eq!(
            parse_incoming(fast),
            Incoming::Message {
                body: Cow::Borrowed("1 2 3 4 xx")
            }
        );
        // Another field order: serde finds it.
        let slow = r#"{"body":"1 2 3 4 xx","type":"message"}"#;
        assert_eq!(
            parse_incoming(slow),
            Incoming::Message {
                body: Cow::Borrowed("1 2 3 4 xx")
            }
        );
        // An escaped body: the fast path declines, serde unescapes.
        let escaped = r#"{"type":"message","body":"say \"hi\""}"#;
        assert_eq!(
            parse_incoming(escaped),
            Incoming::Message {
                body: Cow::Owned("say \"hi\"".into())
            }
        );
        let ack = r#"{"type":"ack","ref":"1.2.3","id":"x","chat":"y","seq":7,"ts":8}"#;
        assert_eq!(
            parse_incoming(ack),
            Incoming::Ack {
                reference: Some(Cow::Borrowed("1.2.3"))
            }
        );
        let err = r#"{"type":"error","code":"rate_limited","message":"slow down","ref":"1.2.3"}"#;
        assert_eq!(
            parse_incoming(err),
            Incoming::Error {
                code: Cow::Borrowed("rate_limited"),
                reference: Some(Cow::Borrowed("1.2.3"))
            }
        );
        assert_eq!(
            parse_incoming(r#"{"type":"joined","chat":"a","user":"b"}"#),
            Incoming::Other
        );
        assert_eq!(parse_incoming("not json"), Incoming::Bad);
    }
}
