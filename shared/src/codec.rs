//! Wire encodings of events: JSON in text frames, MessagePack in binary ones.
//!
//! MessagePack uses maps with string keys and ids as strings (the same object
//! as the JSON form, as the contract says), so any language's MessagePack
//! library reads it. Decoding never panics; every failure is a `DecodeError`
//! that carries the frame's `ref` when one could be read, so the reply can
//! echo it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::protocol::ClientFrame;

/// The encoding of a connection: the encoding of the first frame its client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    MsgPack,
}

/// A frame that is not a valid client event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// The frame's `ref`, when the frame was an object with a string `ref`.
    pub reference: Option<String>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("json encoding failed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("msgpack encoding failed: {0}")]
    MsgPack(#[from] rmp_serde::encode::Error),
}

/// Encodes any serializable value in `encoding`.
pub fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Result<Vec<u8>, EncodeError> {
    match encoding {
        Encoding::Json => Ok(serde_json::to_vec(value)?),
        Encoding::MsgPack => {
            let mut buf = Vec::with_capacity(128);
            let mut ser = rmp_serde::Serializer::new(&mut buf)
                .with_struct_map()
                .with_human_readable();
            value.serialize(&mut ser)?;
            Ok(buf)
        }
    }
}

/// Decodes any value from `encoding`; the error is the decoder's message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], encoding: Encoding) -> Result<T, String> {
    match encoding {
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Encoding::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
            T::deserialize(&mut de).map_err(|e| e.to_string())
        }
    }
}

/// Decodes one client frame. On failure, tries to recover the `ref` so the
/// `error` reply can echo it.
pub fn decode_client(bytes: &[u8], encoding: Encoding) -> Result<ClientFrame, DecodeError> {
    decode::<ClientFrame>(bytes, encoding).map_err(|message| DecodeError {
        reference: probe_ref(bytes, encoding),
        message: describe(message),
    })
}

/// Turns serde's messages into ones a client developer can act on.
fn describe(message: String) -> String {
    if message.contains("unknown variant") {
        format!("unknown event type: {message}")
    } else if message.contains("missing field `type`") {
        "every event needs a string field `type`".to_string()
    } else {
        message
    }
}

fn probe_ref(bytes: &[u8], encoding: Encoding) -> Option<String> {
    #[derive(Deserialize)]
    struct RefOnly {
        #[serde(rename = "ref")]
        reference: Option<String>,
    }
    decode::<RefOnly>(bytes, encoding).ok()?.reference
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientEvent, ErrorCode, Message, ServerEvent};
    use uuid::Uuid;

    #[test]
    fn a_json_send_decodes_with_its_ref() {
        let chat = Uuid::now_v7();
        let frame = format!(r#"{{"type":"send","chat":"{chat}","body":"hi","ref":"r1","extra":1}}"#);
        let decoded = decode_client(frame.as_bytes(), Encoding::Json).unwrap();
        assert_eq!(decoded.reference.as_deref(), Some("r1"));
        assert_eq!(
            decoded.event,
            ClientEvent::Send {
                to: None,
                chat: Some(chat),
                body: "hi".into(),
                id: None
            }
        );
    }

    #[test]
    fn an_unknown_type_is_an_error_that_keeps_the_ref() {
        let err = decode_client(br#"{"type":"dance","ref":"r9"}"#, Encoding::Json).unwrap_err();
        assert_eq!(err.reference.as_deref(), Some("r9"));
        assert!(err.message.contains("unknown event type"), "{}", err.message);
    }

    #[test]
    fn a_non_uuid_is_an_error() {
        let err = decode_client(br#"{"type":"join","chat":"nope"}"#, Encoding::Json).unwrap_err();
        assert_eq!(err.reference, None);
    }

    #[test]
    fn msgpack_uses_string_keys_and_string_ids() {
        let msg = ServerEvent::Message(Message {
            id: Uuid::now_v7(),
            chat: Uuid::now_v7(),
            seq: 7,
            from: Uuid::now_v7(),
            to: None,
            body: "hé".into(),
            ts: 1,
        });
        let bytes = encode(&msg, Encoding::MsgPack).unwrap();
        // Read back generically: a byte-array id would come out as a JSON array.
        let generic: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert!(generic["id"].is_string(), "{generic}");
        assert_eq!(generic["type"], "message");
        assert_eq!(decode::<ServerEvent>(&bytes, Encoding::MsgPack).unwrap(), msg);
    }

    #[test]
    fn errors_serialize_with_contract_codes() {
        let e = ServerEvent::error(ErrorCode::TooLarge, "body over 4096 bytes", Some("x".into()));
        let json: serde_json::Value = serde_json::from_slice(&encode(&e, Encoding::Json).unwrap()).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "too_large");
        assert_eq!(json["ref"], "x");
    }
}
