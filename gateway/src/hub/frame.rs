//! An event encoded once, shared by every connection that receives it.

use shared::codec::{encode, Encoding};
use shared::protocol::ServerEvent;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A WebSocket frame ready to write. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Frame(WsMessage);

impl Frame {
    /// Encodes `event`: a text frame for JSON, a binary one for MessagePack.
    pub fn encode(event: &ServerEvent, encoding: Encoding) -> Frame {
        match encode(event, encoding) {
            Ok(bytes) => Frame::from_bytes(bytes, encoding),
            // Our own event types always encode; keep the connection alive
            // with an explicit error instead of a panic if that ever breaks.
            Err(e) => {
                tracing::error!(error = %e, "failed to encode a server event");
                Frame(WsMessage::text(
                    r#"{"type":"error","code":"unavailable","message":"encoding failed"}"#,
                ))
            }
        }
    }

    fn from_bytes(bytes: Vec<u8>, encoding: Encoding) -> Frame {
        match encoding {
            Encoding::Json => match String::from_utf8(bytes) {
                Ok(text) => Frame(WsMessage::text(text)),
                Err(e) => Frame(WsMessage::binary(e.into_bytes())),
            },
            Encoding::MsgPack => Frame(WsMessage::binary(bytes)),
        }
    }

    pub fn into_message(self) -> WsMessage {
        self.0
    }
}

/// An event with its frames, encoded on first use per encoding.
pub(super) struct LazyFrames {
    event: ServerEvent,
    json: Option<Frame>,
    msgpack: Option<Frame>,
}

impl LazyFrames {
    pub(super) fn new(event: ServerEvent) -> LazyFrames {
        LazyFrames {
            event,
            json: None,
            msgpack: None,
        }
    }

    /// The event's contract `type`, for metrics.
    pub(super) fn kind(&self) -> &'static str {
        self.event.kind()
    }

    pub(super) fn get(&mut self, encoding: Encoding) -> Frame {
        let LazyFrames { event, json, msgpack } = self;
        let slot = match encoding {
            Encoding::Json => json,
            Encoding::MsgPack => msgpack,
        };
        slot.get_or_insert_with(|| {
            metrics::counter!("gateway_frames_encoded_total").increment(1);
            Frame::encode(event, encoding)
        })
        .clone()
    }
}
