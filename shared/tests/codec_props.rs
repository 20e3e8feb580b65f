//! Property tests of the wire codecs: every event the contract defines,
//! with arbitrary ids, strings (any Unicode), optional fields and integers,
//! decodes to itself after encoding, in JSON and in MessagePack. Client
//! frames go through `decode_client`, the gateway's entry point; server
//! events through `decode`, as a client library would read them.

use proptest::prelude::*;
use shared::codec::{decode, decode_client, encode, Encoding};
use shared::protocol::{ClientEvent, ClientFrame, ErrorCode, Message, ServerEvent};
use uuid::Uuid;

const ENCODINGS: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn text() -> impl Strategy<Value = String> {
    // proptest's `String` strategy draws from all of Unicode; mix in the
    // empty string and JSON's special characters more often than chance would.
    prop_oneof![
        4 => any::<String>(),
        1 => Just(String::new()),
        1 => "[\"\\\\/\u{0}-\u{1f}\u{7f}\u{2028}\u{2029}\u{fffd}\u{1f600}a-z]{0,16}",
    ]
}

fn reference() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

fn client_event() -> impl Strategy<Value = ClientEvent> {
    let maybe = || proptest::option::of(uuid());
    prop_oneof![
        (maybe(), maybe(), text(), maybe()).prop_map(|(to, chat, body, id)| ClientEvent::Send { to, chat, body, id }),
        (maybe(), maybe()).prop_map(|(to, chat)| ClientEvent::Typing { to, chat }),
        uuid().prop_map(|chat| ClientEvent::Join { chat }),
        uuid().prop_map(|chat| ClientEvent::Leave { chat }),
        Just(ClientEvent::Ping),
        text().prop_map(|token| ClientEvent::Auth { token }),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    (reference(), client_event()).prop_map(|(reference, event)| ClientFrame { reference, event })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Forbidden),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Unavailable),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        uuid(),
        uuid(),
        any::<i64>(),
        uuid(),
        proptest::option::of(uuid()),
        text(),
        any::<i64>(),
    )
        .prop_map(|(id, chat, seq, from, to, body, ts)| Message {
            id,
            chat,
            seq,
            from,
            to,
            body,
            ts,
        })
}

fn server_event() -> impl Strategy<Value = ServerEvent> {
    let maybe = || proptest::option::of(uuid());
    prop_oneof![
        message().prop_map(ServerEvent::Message),
        (reference(), uuid(), uuid(), any::<i64>(), any::<i64>()).prop_map(|(reference, id, chat, seq, ts)| {
            ServerEvent::Ack {
                reference,
                id,
                chat,
                seq,
                ts,
            }
        }),
        (uuid(), maybe(), maybe()).prop_map(|(from, chat, to)| ServerEvent::Typing { from, chat, to }),
        (uuid(), uuid()).prop_map(|(chat, user)| ServerEvent::Joined { chat, user }),
        (uuid(), uuid()).prop_map(|(chat, user)| ServerEvent::Left { chat, user }),
        reference().prop_map(|reference| ServerEvent::Pong { reference }),
        (reference(), any::<i64>()).prop_map(|(reference, exp)| ServerEvent::Authed { reference, exp }),
        (error_code(), text(), reference()).prop_map(|(code, message, reference)| ServerEvent::Error {
            code,
            message,
            reference
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn every_client_frame_decodes_to_itself(frame in client_frame()) {
        for encoding in ENCODINGS {
            let bytes = encode(&frame, encoding).expect("encoding");
            let decoded = decode_client(&bytes, encoding);
            prop_assert_eq!(decoded.as_ref(), Ok(&frame), "{:?}: {:?}", encoding, bytes);
        }
    }

    #[test]
    fn every_server_event_decodes_to_itself(event in server_event()) {
        for encoding in ENCODINGS {
            let bytes = encode(&event, encoding).expect("encoding");
            let decoded = decode::<ServerEvent>(&bytes, encoding);
            prop_assert_eq!(decoded.as_ref(), Ok(&event), "{:?}: {:?}", encoding, bytes);
        }
    }

    /// The same holds for a message as history returns it (no `type`).
    #[test]
    fn every_message_decodes_to_itself(message in message()) {
        for encoding in ENCODINGS {
            let bytes = encode(&message, encoding).expect("encoding");
            prop_assert_eq!(decode::<Message>(&bytes, encoding), Ok(message.clone()), "{:?}", encoding);
        }
    }
}
