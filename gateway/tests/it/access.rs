//! Access control, as a matrix: every WebSocket event and REST endpoint that
//! names a chat × who asks (a member, a non-member, a removed member) × the
//! kind of chat (public group, private group, private two-user chat, and an
//! id that names no chat). Each cell runs on fresh users and a fresh chat,
//! and asserts the exact contract answer.
//!
//! The rules (shared/protocol.md, Chats; docs/api.md, Events and HTTP): a
//! non-member of an existing chat gets `forbidden` / 403, an unknown chat
//! `not_found` / 404; a removed member is a non-member; anyone may join a
//! public group, no one joins a private group or a private chat; a member
//! adds anyone to a group, no one to a private chat; a user removes only
//! themselves, and no one leaves a private chat.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, canonical_uuid, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PublicGroup,
    PrivateGroup,
    /// The private chat of two users.
    Direct,
    /// A chat id that names no chat.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Member,
    NonMember,
    /// Was a member and removed themselves.
    Removed,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// WebSocket `send` with `chat`.
    Send,
    /// WebSocket `typing` with `chat`.
    Typing,
    /// WebSocket `join`.
    Join,
    /// WebSocket `leave`.
    Leave,
    /// `POST /v1/chats/{chat}/members` (someone else).
    AddMember,
    /// `DELETE /v1/chats/{chat}/members/{self}`.
    RemoveSelf,
    /// `DELETE /v1/chats/{chat}/members/{another member}`.
    RemoveOther,
    /// `GET /v1/chats/{chat}/messages`.
    History,
    /// `GET /v1/chats`: is the chat listed?
    List,
}

/// What the contract answers. `Allow` is the success of the operation:
/// `ack`, no error (typing), `joined`, `left`, 204 or 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allow,
    /// `forbidden` / 403.
    Forbid,
    /// `not_found` / 404.
    NotFound,
    /// In `GET /v1/chats`.
    Listed,
    /// Not in `GET /v1/chats`.
    Hidden,
}

/// The matrix's columns. A private chat has no removed member: its two
/// users cannot leave it (the `RemoveSelf` and `Leave` rows show that).
const COLUMNS: [(Kind, Role); 9] = [
    (Kind::PublicGroup, Role::Member),
    (Kind::PublicGroup, Role::NonMember),
    (Kind::PublicGroup, Role::Removed),
    (Kind::PrivateGroup, Role::Member),
    (Kind::PrivateGroup, Role::NonMember),
    (Kind::PrivateGroup, Role::Removed),
    (Kind::Direct, Role::Member),
    (Kind::Direct, Role::NonMember),
    (Kind::Unknown, Role::NonMember),
];

use Outcome::{Allow, Forbid, Hidden, Listed, NotFound};

#[rustfmt::skip]
const MATRIX: [(Op, [Outcome; 9]); 9] = [
    //                  public group               private group              private chat      no chat
    //                  member  non-mem removed    member  non-mem removed    member  non-mem
    (Op::Send,        [Allow,  Forbid, Forbid,    Allow,  Forbid, Forbid,    Allow,  Forbid,    NotFound]),
    (Op::Typing,      [Allow,  Forbid, Forbid,    Allow,  Forbid, Forbid,    Allow,  Forbid,    NotFound]),
    (Op::Join,        [Allow,  Allow,  Allow,     Allow,  Forbid, Forbid,    Forbid, Forbid,    NotFound]),
    (Op::Leave,       [Allow,  Forbid, Forbid,    Allow,  Forbid, Forbid,    Forbid, Forbid,    NotFound]),
    (Op::AddMember,   [Allow,  Forbid, Forbid,    Allow,  Forbid, Forbid,    Forbid, Forbid,    NotFound]),
    (Op::RemoveSelf,  [Allow,  Forbid, Forbid,    Allow,  Forbid, Forbid,    Forbid, Forbid,    NotFound]),
    (Op::RemoveOther, [Forbid, Forbid, Forbid,    Forbid, Forbid, Forbid,    Forbid, Forbid,    NotFound]),
    (Op::History,     [Allow,  Forbid, Forbid,    Allow,  Forbid, Forbid,    Allow,  Forbid,    NotFound]),
    (Op::List,        [Listed, Hidden, Hidden,    Listed, Hidden, Hidden,    Listed, Hidden,    Hidden]),
];

/// One cell's world: a chat of `kind` (created by `owner`, who is a member)
/// and `subject`, who is in it as `role` says.
struct Scene {
    chat: Uuid,
    owner: Uuid,
    subject: Uuid,
}

async fn scene(stack: &Stack, kind: Kind, role: Role) -> Scene {
    let api = stack.http(0);
    let (owner, subject) = (harness::user(), harness::user());
    let chat = match kind {
        Kind::PublicGroup | Kind::PrivateGroup => {
            let visibility = if kind == Kind::PublicGroup { "public" } else { "private" };
            let members = if role == Role::NonMember { vec![] } else { vec![subject] };
            let (status, body) = api.create_chat(owner, "matrix", visibility, &members).await;
            assert_eq!(status, 201, "creating a {visibility} group: {body}");
            canonical_uuid(&body["id"], "chat id")
        }
        Kind::Direct => {
            // A private chat comes into being with its first message: between
            // the owner and the subject, or the owner and a third user.
            let other = if role == Role::Member { subject } else { harness::user() };
            let mut client = stack.connect(0, owner).await;
            let ack = client.send_message_to(other, "hello").await;
            client.close().await;
            canonical_uuid(&ack["chat"], "private chat id")
        }
        Kind::Unknown => Uuid::new_v4(),
    };
    if role == Role::Removed {
        let (status, body) = api.remove_member(subject, chat, subject).await;
        assert_eq!(status, 204, "the subject removing themselves: {body}");
    }
    Scene { chat, owner, subject }
}

/// Runs `op` as the scene's subject and reads the answer.
async fn perform(stack: &Stack, scene: &Scene, op: Op) -> (Outcome, Value) {
    let api = stack.http(0);
    let Scene { chat, owner, subject } = *scene;
    let chat_text = chat.to_string();
    let rest = |(status, body): (u16, Value)| {
        let outcome = match (status, body["code"].as_str()) {
            (200 | 204, _) => Outcome::Allow,
            (403, Some("forbidden")) => Outcome::Forbid,
            (404, Some("not_found")) => Outcome::NotFound,
            _ => panic!("{op:?}: unexpected answer {status} {body}"),
        };
        (outcome, json!({ "status": status, "body": body }))
    };
    match op {
        Op::Send | Op::Typing | Op::Join | Op::Leave => {
            let mut client = stack.connect(0, subject).await;
            let reply = match op {
                Op::Send => {
                    client
                        .request(json!({ "type": "send", "chat": chat_text, "body": "matrix" }))
                        .await
                }
                Op::Typing => typing(&mut client, &chat_text).await,
                Op::Join => client.join(chat).await,
                _ => client.leave(chat).await,
            };
            let outcome = match (reply["type"].as_str(), reply["code"].as_str()) {
                (Some("ack" | "pong" | "joined" | "left"), _) => Outcome::Allow,
                (Some("error"), Some("forbidden")) => Outcome::Forbid,
                (Some("error"), Some("not_found")) => Outcome::NotFound,
                _ => panic!("{op:?}: unexpected reply {reply}"),
            };
            (outcome, reply)
        }
        Op::AddMember => rest(api.add_member(subject, chat, harness::user()).await),
        Op::RemoveSelf => rest(api.remove_member(subject, chat, subject).await),
        Op::RemoveOther => rest(api.remove_member(subject, chat, owner).await),
        Op::History => rest(api.history(subject, chat, "").await),
        Op::List => {
            let (status, body) = api.list_chats(subject).await;
            assert_eq!(status, 200, "{body}");
            let listed = body
                .as_array()
                .unwrap_or_else(|| panic!("GET /v1/chats is not a list: {body}"))
                .iter()
                .any(|c| c["id"] == json!(chat_text));
            (if listed { Outcome::Listed } else { Outcome::Hidden }, body)
        }
    }
}

/// `typing` answers nothing when it passes: it is followed by a `ping`, and
/// the first of "an error echoing the typing's ref" and the `pong` is the
/// answer (the gateway handles a connection's events in order).
async fn typing(client: &mut Client, chat: &str) -> Value {
    client
        .send_json(json!({ "type": "typing", "chat": chat, "ref": "typing" }))
        .await;
    client.send_json(json!({ "type": "ping", "ref": "after" })).await;
    client
        .wait_for("the answer to typing", DEFAULT_TIMEOUT, |e| {
            e["ref"] == "typing" || e["ref"] == "after"
        })
        .await
}

#[tokio::test]
async fn every_event_and_endpoint_answers_each_role_and_kind_of_chat_as_the_contract_says() {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let mut failures = Vec::new();
    let mut cells = 0;
    for (op, row) in MATRIX {
        for ((kind, role), expected) in COLUMNS.into_iter().zip(row) {
            let scene = scene(&stack, kind, role).await;
            let (got, answer) = perform(&stack, &scene, op).await;
            cells += 1;
            if got != expected {
                failures.push(format!(
                    "{op:?} by a {role:?} of a {kind:?} chat: expected {expected:?}, got {got:?} ({answer})"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cells} cells differ from the contract:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}
