//! Group chats (contract: `send` with `chat`, `join`, `leave`, `joined` /
//! `left`, and the Chats REST API): delivery across two gateways, the
//! members-only rules, and what a non-member never sees.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, canonical_uuid, Api, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

/// How long the persister may take to store a message.
const STORED: Duration = Duration::from_secs(15);
/// How long a connection is watched for something that must not come.
const QUIET: Duration = Duration::from_millis(300);

fn two_gateways(persister: bool) -> StackOptions {
    StackOptions {
        gateways: 2,
        persister,
        ..StackOptions::default()
    }
}

/// Creates a group as `owner`; returns its id.
async fn create_group(api: &Api, owner: Uuid, visibility: &str, members: &[Uuid]) -> Uuid {
    let (status, body) = api.create_chat(owner, "a group", visibility, members).await;
    assert_eq!(status, 201, "creating a {visibility} group: {body}");
    canonical_uuid(&body["id"], "the new chat's id")
}

fn user_ids(users: &[Uuid]) -> BTreeSet<String> {
    users.iter().map(Uuid::to_string).collect()
}

/// Checks a `joined` / `left` event.
async fn expect_membership(client: &mut Client, ty: &str, chat: Uuid, user: Uuid, who: &str) {
    let event = client.expect(ty, DEFAULT_TIMEOUT).await;
    assert_eq!(event["chat"], json!(chat.to_string()), "{who}: {event}");
    assert_eq!(event["user"], json!(user.to_string()), "{who}: {event}");
}

fn chat_ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("GET /v1/chats is not a list: {list}"))
        .iter()
        .map(|c| c["id"].as_str().expect("a chat id").to_string())
        .collect()
}

#[tokio::test]
async fn members_spread_across_two_gateways_receive_every_group_message() {
    let stack = Stack::start(two_gateways(true)).await;
    let (alice, bob, carol, dave) = (harness::user(), harness::user(), harness::user(), harness::user());
    let chat = create_group(&stack.http(0), alice, "private", &[bob, carol, dave]).await;

    let mut alice_0 = stack.connect(0, alice).await;
    let mut alice_1 = stack.connect(1, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let mut carol_0 = stack.connect(0, carol).await;
    let mut dave_1 = stack.connect(1, dave).await;

    // Alice (gateway 0) and Bob (gateway 1) take turns.
    let mut acks = Vec::new();
    for i in 0..5 {
        for (from, client) in [(alice, &mut alice_0), (bob, &mut bob_1)] {
            let body = format!("{i} from {from}");
            let ack = client.send_to_chat(chat, &body).await;
            assert_eq!(ack["chat"], json!(chat.to_string()), "{ack}");
            acks.push((from, body, ack));
        }
    }

    let expected: Vec<Value> = acks
        .iter()
        .map(|(from, body, ack)| {
            json!({
                "type": "message", "id": ack["id"], "chat": ack["chat"], "seq": ack["seq"],
                "from": from.to_string(), "body": body, "ts": ack["ts"],
            })
        })
        .collect();
    let check = |who: &str, got: &[Value], expected: &[&Value]| {
        assert_eq!(got.len(), expected.len());
        for (got, expected) in got.iter().zip(expected) {
            for field in ["type", "id", "chat", "seq", "from", "body", "ts"] {
                assert_eq!(
                    got[field], expected[field],
                    "{who}: `{field}` of {got}, expected {expected}"
                );
            }
            assert!(!got["to"].is_string(), "{who}: a group message has no `to`: {got}");
        }
    };
    let all: Vec<&Value> = expected.iter().collect();
    for (who, client) in [
        ("Alice's other device", &mut alice_1),
        ("Carol", &mut carol_0),
        ("Dave", &mut dave_1),
    ] {
        let got = client.expect_n("message", all.len(), DEFAULT_TIMEOUT).await;
        check(who, &got, &all);
        let seqs: Vec<i64> = got.iter().map(|m| m["seq"].as_i64().expect("seq")).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{who}: seq is not consecutive: {seqs:?}"
        );
    }
    // Each sending connection gets the other's messages, not its own.
    for (who, sender, client) in [("Alice", alice, &mut alice_0), ("Bob", bob, &mut bob_1)] {
        let others: Vec<&Value> = expected
            .iter()
            .filter(|m| m["from"] != json!(sender.to_string()))
            .collect();
        let got = client.expect_n("message", others.len(), DEFAULT_TIMEOUT).await;
        check(who, &got, &others);
        client.expect_none("message", QUIET).await;
    }

    let history = stack.wait_for_history(carol, chat, expected.len(), STORED).await;
    let history_ids: Vec<&Value> = history.iter().map(|m| &m["id"]).collect();
    let live_ids: Vec<&Value> = expected.iter().map(|m| &m["id"]).collect();
    assert_eq!(history_ids, live_ids, "history is not the live order");
}

#[tokio::test]
async fn a_non_member_cannot_send_or_type_to_a_group_and_nothing_reaches_its_members() {
    let stack = Stack::start(two_gateways(false)).await;
    let (alice, bob, eve) = (harness::user(), harness::user(), harness::user());
    let chat = create_group(&stack.http(0), alice, "public", &[bob]).await;
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let mut eve_0 = stack.connect(0, eve).await;

    let reply = eve_0
        .request(json!({ "type": "send", "chat": chat.to_string(), "body": "let me in", "ref": "e1" }))
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert_eq!(reply["ref"], "e1", "{reply}");
    assert!(reply["message"].is_string(), "{reply}");

    let reply = eve_0
        .request(json!({ "type": "typing", "chat": chat.to_string(), "ref": "e2" }))
        .await;
    assert_eq!(
        (&reply["type"], &reply["code"], &reply["ref"]),
        (&json!("error"), &json!("forbidden"), &json!("e2"))
    );

    let unknown = Uuid::new_v4();
    let reply = eve_0
        .request(json!({ "type": "send", "chat": unknown.to_string(), "body": "hello?", "ref": "e3" }))
        .await;
    assert_eq!(
        (&reply["type"], &reply["code"], &reply["ref"]),
        (&json!("error"), &json!("not_found"), &json!("e3"))
    );

    // The members' next event is Alice's message: nothing of Eve's came
    // before it.
    let ack = alice_0.send_to_chat(chat, "members only").await;
    let got = bob_1.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!((&got["type"], &got["id"]), (&json!("message"), &ack["id"]), "{got}");
}

#[tokio::test]
async fn joining_and_leaving_a_public_group_tells_its_members_and_the_user() {
    let stack = Stack::start(two_gateways(false)).await;
    let (alice, bob, eve) = (harness::user(), harness::user(), harness::user());
    let chat = create_group(&stack.http(0), alice, "public", &[bob]).await;
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let mut eve_0 = stack.connect(0, eve).await;
    let mut eve_1 = stack.connect(1, eve).await;

    eve_0
        .send_json(json!({ "type": "join", "chat": chat.to_string(), "ref": "j" }))
        .await;
    for (who, client) in [
        ("Eve's joining connection", &mut eve_0),
        ("Eve's other device", &mut eve_1),
        ("Alice", &mut alice_0),
        ("Bob", &mut bob_1),
    ] {
        expect_membership(client, "joined", chat, eve, who).await;
    }
    // Eve's other device has seen the join; once it has answered a ping it
    // receives the chat as well.
    eve_1.ping().await;

    let ack = alice_0.send_to_chat(chat, "welcome Eve").await;
    for (who, client) in [
        ("Eve", &mut eve_0),
        ("Eve's other device", &mut eve_1),
        ("Bob", &mut bob_1),
    ] {
        let got = client.expect("message", DEFAULT_TIMEOUT).await;
        assert_eq!(got["id"], ack["id"], "{who}: {got}");
    }
    let ack = eve_1.send_to_chat(chat, "thanks").await;
    let got = alice_0.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], ack["id"], "a new member's message reaches the others: {got}");

    eve_1
        .send_json(json!({ "type": "leave", "chat": chat.to_string(), "ref": "l" }))
        .await;
    for (who, client) in [
        ("Eve's leaving connection", &mut eve_1),
        ("Eve's other device", &mut eve_0),
        ("Alice", &mut alice_0),
        ("Bob", &mut bob_1),
    ] {
        expect_membership(client, "left", chat, eve, who).await;
    }

    let ack = alice_0.send_to_chat(chat, "after Eve left").await;
    let got = bob_1.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], ack["id"], "{got}");
    for client in [&mut eve_0, &mut eve_1] {
        client.expect_none("message", QUIET).await;
    }
    let reply = eve_0
        .request(json!({ "type": "send", "chat": chat.to_string(), "body": "still here?" }))
        .await;
    assert_eq!(reply["code"], "forbidden", "a user who left is no member: {reply}");
}

#[tokio::test]
async fn a_private_groups_messages_never_reach_a_non_member_on_the_same_gateway() {
    let stack = Stack::start(two_gateways(false)).await;
    let (alice, bob, eve) = (harness::user(), harness::user(), harness::user());
    let chat = create_group(&stack.http(0), alice, "private", &[bob]).await;
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let mut eve_0 = stack.connect(0, eve).await;
    let mut eve_1 = stack.connect(1, eve).await;

    let reply = eve_0
        .request(json!({ "type": "join", "chat": chat.to_string(), "ref": "j1" }))
        .await;
    assert_eq!(
        (&reply["type"], &reply["code"], &reply["ref"]),
        (&json!("error"), &json!("forbidden"), &json!("j1"))
    );
    let reply = eve_0
        .request(json!({ "type": "join", "chat": Uuid::new_v4().to_string(), "ref": "j2" }))
        .await;
    assert_eq!(
        (&reply["type"], &reply["code"], &reply["ref"]),
        (&json!("error"), &json!("not_found"), &json!("j2"))
    );

    // Alice writes while Eve, on both gateways, keeps trying to join.
    const MESSAGES: usize = 150;
    const ATTEMPTS: usize = 40;
    let alice_writes = async {
        let mut ids = Vec::new();
        for i in 0..MESSAGES {
            ids.push(alice_0.send_to_chat(chat, &format!("secret {i}")).await["id"].clone());
        }
        ids
    };
    let (ids, (), ()) = tokio::join!(
        alice_writes,
        keep_trying_to_join(&mut eve_0, chat, ATTEMPTS),
        keep_trying_to_join(&mut eve_1, chat, ATTEMPTS)
    );

    for client in [&mut bob_0, &mut bob_1] {
        let got = client.expect_n("message", MESSAGES, DEFAULT_TIMEOUT).await;
        let got: Vec<&Value> = got.iter().map(|m| &m["id"]).collect();
        assert_eq!(got, ids.iter().collect::<Vec<_>>());
    }
    for client in [&mut eve_0, &mut eve_1] {
        client.expect_none("message", QUIET).await;
        client.expect_none("joined", Duration::ZERO).await;
    }

    // Nor does anything else about it reach Eve.
    let api = stack.http(1);
    let (status, body) = api.history(eve, chat, "").await;
    assert_eq!(status, 403, "{body}");
    let (status, list) = api.list_chats(eve).await;
    assert_eq!(status, 200, "{list}");
    assert!(!chat_ids(&list).contains(&chat.to_string()), "{list}");
    let reply = eve_1
        .request(json!({ "type": "typing", "chat": chat.to_string() }))
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
}

/// Sends `join` for `chat` `attempts` times; each must be refused.
async fn keep_trying_to_join(client: &mut Client, chat: Uuid, attempts: usize) {
    for _ in 0..attempts {
        let reply = client
            .request(json!({ "type": "join", "chat": chat.to_string() }))
            .await;
        assert_eq!(reply["code"], "forbidden", "{reply}");
    }
}

#[tokio::test]
async fn the_chats_api_creates_lists_and_changes_members_by_the_rules() {
    let stack = Stack::start(two_gateways(false)).await;
    let api = stack.http(0);
    let (alice, bob, carol, dave, eve) = (
        harness::user(),
        harness::user(),
        harness::user(),
        harness::user(),
        harness::user(),
    );

    // Create: 201 with the contract's fields; the creator is a member.
    let (status, created) = api.create_chat(alice, "Book club", "private", &[bob]).await;
    assert_eq!(status, 201, "{created}");
    let chat = canonical_uuid(&created["id"], "id");
    assert_eq!(created["title"], "Book club", "{created}");
    assert_eq!(created["visibility"], "private", "{created}");
    let members: BTreeSet<String> = created["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members is not a list: {created}"))
        .iter()
        .map(|m| canonical_uuid(m, "a member").to_string())
        .collect();
    assert_eq!(members, user_ids(&[alice, bob]), "{created}");
    let (status, public) = api.create_chat(bob, "Open house", "public", &[]).await;
    assert_eq!(status, 201, "{public}");
    assert_eq!(public["visibility"], "public", "{public}");
    assert_eq!(public["members"], json!([bob.to_string()]), "{public}");
    let public = canonical_uuid(&public["id"], "id");

    // List: the caller's chats, with id, title and visibility.
    let (status, list) = api.list_chats(bob).await;
    assert_eq!(status, 200, "{list}");
    for (id, title, visibility) in [(chat, "Book club", "private"), (public, "Open house", "public")] {
        let entry = list
            .as_array()
            .expect("a list")
            .iter()
            .find(|c| c["id"] == json!(id.to_string()))
            .unwrap_or_else(|| panic!("{id} missing from Bob's chats: {list}"));
        assert_eq!(entry["title"], title, "{entry}");
        assert_eq!(entry["visibility"], visibility, "{entry}");
    }
    let (_, list) = api.list_chats(alice).await;
    assert_eq!(chat_ids(&list), vec![chat.to_string()], "Alice is in one chat: {list}");
    let (_, list) = api.list_chats(carol).await;
    assert_eq!(chat_ids(&list), Vec::<String>::new(), "{list}");

    // Only a member may add someone.
    let (status, body) = api.add_member(carol, chat, dave).await;
    assert_eq!(status, 403, "a non-member added someone: {body}");

    let mut alice_0 = stack.connect(0, alice).await;
    let mut carol_1 = stack.connect(1, carol).await;
    let (status, body) = api.add_member(bob, chat, carol).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(body, Value::Null, "204 has no body");
    expect_membership(&mut alice_0, "joined", chat, carol, "Alice").await;
    expect_membership(&mut carol_1, "joined", chat, carol, "Carol").await;
    let (_, list) = api.list_chats(carol).await;
    assert_eq!(chat_ids(&list), vec![chat.to_string()], "{list}");
    // Carol's open connection now receives the chat.
    carol_1.ping().await;
    let ack = alice_0.send_to_chat(chat, "hi Carol").await;
    let got = carol_1.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], ack["id"], "{got}");

    // A user may remove only themselves.
    for (actor, member) in [(bob, carol), (alice, bob), (eve, carol)] {
        let (status, body) = api.remove_member(actor, chat, member).await;
        assert_eq!(status, 403, "{actor} removed {member}: {body}");
    }
    let (status, body) = api.remove_member(carol, chat, carol).await;
    assert_eq!(status, 204, "{body}");
    expect_membership(&mut alice_0, "left", chat, carol, "Alice").await;
    expect_membership(&mut carol_1, "left", chat, carol, "Carol").await;
    let (_, list) = api.list_chats(carol).await;
    assert_eq!(chat_ids(&list), Vec::<String>::new(), "{list}");

    // History is for members: 403 for a chat that exists, 404 for none.
    let (status, body) = api.history(bob, chat, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["messages"].is_array(), "{body}");
    for user in [carol, eve] {
        let (status, body) = api.history(user, chat, "").await;
        assert_eq!(status, 403, "{body}");
    }
    let (status, body) = api.history(alice, Uuid::new_v4(), "").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = api.add_member(alice, Uuid::new_v4(), bob).await;
    assert_eq!(status, 404, "{body}");
}
