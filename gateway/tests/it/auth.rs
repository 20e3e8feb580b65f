//! Authentication (contract: Authentication): a missing, malformed, wrongly
//! signed or expired token gets HTTP 401 and, on `/v1/ws`, no upgrade, in
//! either of the two places a token may be given; `auth` replaces a
//! connection's token; an expired connection is closed with 4001.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{self, now_secs, Stack, StackOptions};

fn one_gateway() -> StackOptions {
    StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    }
}

/// Every token the gateway must refuse, with a name for failure messages.
fn bad_tokens(stack: &Stack) -> Vec<(&'static str, String)> {
    let user = harness::user();
    vec![
        (
            "a token signed with another secret",
            stack.token_signed_with(user, "some-other-secret-0123456789"),
        ),
        ("an expired token", stack.token_expiring_in(user, -10)),
        ("a token that is not a JWT", "not-a-jwt".to_string()),
        (
            "a token whose sub is not a UUID",
            stack.token_with_claims(json!({ "sub": "bob", "exp": now_secs() + 3600 })),
        ),
        (
            "a token without exp",
            stack.token_with_claims(json!({ "sub": user.to_string() })),
        ),
    ]
}

#[tokio::test]
async fn a_websocket_without_a_valid_token_gets_401_and_no_upgrade() {
    let stack = Stack::start(one_gateway()).await;

    assert_eq!(stack.try_connect_raw(0, None).await.err(), Some(401), "no token at all");
    for (what, token) in bad_tokens(&stack) {
        assert_eq!(
            stack.try_connect_raw(0, Some(&token)).await.err(),
            Some(401),
            "{what} in `Authorization: Bearer`"
        );
        assert_eq!(
            stack.try_connect_query(0, Some(&token)).await.err(),
            Some(401),
            "{what} in `?token=`"
        );
    }

    // The same gateway upgrades a valid token, in either place.
    let token = stack.token(harness::user());
    for (place, result) in [
        ("header", stack.try_connect_raw(0, Some(&token)).await),
        ("query", stack.try_connect_query(0, Some(&token)).await),
    ] {
        let mut client = result.unwrap_or_else(|status| panic!("a valid token in the {place} got HTTP {status}"));
        client.ping().await;
    }
}

#[tokio::test]
async fn the_rest_api_answers_401_without_a_valid_token() {
    let stack = Stack::start(one_gateway()).await;
    let api = stack.http(0);
    let owner = harness::user();
    let (status, created) = api.create_chat(owner, "auth", "public", &[]).await;
    assert_eq!(status, 201, "{created}");
    let chat = created["id"].as_str().expect("chat id").to_string();
    let other = harness::user();

    let endpoints: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/v1/chats".into(), None),
        (
            Method::POST,
            "/v1/chats".into(),
            Some(json!({ "title": "t", "visibility": "public", "members": [] })),
        ),
        (
            Method::POST,
            format!("/v1/chats/{chat}/members"),
            Some(json!({ "user": other.to_string() })),
        ),
        (Method::DELETE, format!("/v1/chats/{chat}/members/{owner}"), None),
        (Method::GET, format!("/v1/chats/{chat}/messages"), None),
    ];
    let mut tokens: Vec<(&str, Option<String>)> = vec![("no token", None)];
    tokens.extend(bad_tokens(&stack).into_iter().map(|(what, t)| (what, Some(t))));

    for (method, path, body) in &endpoints {
        for (what, token) in &tokens {
            let (status, answer) = api.request(method.clone(), path, token.as_deref(), body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {what} (header): {answer}");
            if let Some(token) = token {
                let sep = if path.contains('?') { '&' } else { '?' };
                let with_query = format!("{path}{sep}token={token}");
                let (status, answer) = api.request(method.clone(), &with_query, None, body.clone()).await;
                assert_eq!(status, 401, "{method} {path} with {what} (query): {answer}");
            }
        }
    }

    // Nothing was changed by the refused requests: the owner is still the
    // only member, and the chat still exists.
    let (status, chats) = api.list_chats(owner).await;
    assert_eq!(status, 200, "{chats}");
    assert!(
        chats.as_array().expect("a list").iter().any(|c| c["id"] == json!(chat)),
        "a refused DELETE removed the owner: {chats}"
    );
    let (status, _) = api.list_chats(other).await;
    assert_eq!(status, 200);
    let (status, answer) = api.history(other, chat.parse().expect("uuid"), "").await;
    assert_eq!(status, 403, "a refused POST added a member: {answer}");

    // A valid token in the query works for REST too.
    let token = stack.token(owner);
    let (status, answer) = api
        .request(Method::GET, &format!("/v1/chats?token={token}"), None, None)
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn auth_replaces_the_token_of_the_same_user_and_refuses_any_other() {
    let stack = Stack::start(one_gateway()).await;
    let alice = harness::user();
    let mut client = stack.connect(0, alice).await;

    let fresh_exp = now_secs() + 7200;
    let fresh = harness::mint_token(&stack.secret, alice, fresh_exp);
    let reply = client
        .request(json!({ "type": "auth", "token": fresh, "ref": "a1" }))
        .await;
    assert_eq!(reply["type"], "authed", "{reply}");
    assert_eq!(reply["ref"], "a1", "{reply}");
    assert_eq!(reply["exp"], json!(fresh_exp), "{reply}");

    let refused = [
        ("another user's token", stack.token(harness::user())),
        ("an expired token", stack.token_expiring_in(alice, -10)),
        (
            "a token signed with another secret",
            stack.token_signed_with(alice, "some-other-secret-0123456789"),
        ),
        ("a token that is not a JWT", "garbage".to_string()),
    ];
    for (i, (what, token)) in refused.into_iter().enumerate() {
        let reference = format!("bad{i}");
        let reply = client
            .request(json!({ "type": "auth", "token": token, "ref": reference }))
            .await;
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], "forbidden", "{what}: {reply}");
        assert_eq!(reply["ref"], json!(reference), "{what}: {reply}");
        assert!(reply["message"].is_string(), "{what}: {reply}");
    }
    // The connection is still open and still alice's.
    client.ping().await;
    let ack = client.send_message_to(alice, "still me").await;
    assert_eq!(ack["chat"], json!(harness::private_chat(alice, alice).to_string()));
}

#[tokio::test]
async fn a_connection_whose_token_expires_is_closed_with_4001_unless_auth_renewed_it() {
    let stack = Stack::start(one_gateway()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let expiring = |user| stack.token_expiring_in(user, 2);

    let mut left_alone = stack
        .try_connect_raw(0, Some(&expiring(alice)))
        .await
        .expect("a token valid for 2 s upgrades");
    let mut renewed = stack
        .try_connect_raw(0, Some(&expiring(bob)))
        .await
        .expect("a token valid for 2 s upgrades");
    let reply = renewed.auth(&stack.token(bob)).await;
    assert_eq!(reply["type"], "authed", "{reply}");

    let closed = left_alone.expect("__close", Duration::from_secs(10)).await;
    assert_eq!(closed["code"], 4001, "{closed}");

    // By now the renewed connection's first token has expired too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    renewed.ping().await;
    renewed.expect_none("__close", Duration::from_millis(200)).await;
}

/// An `Authorization` header that is not text (bytes above 0x7f) is a
/// malformed token: 401 on REST and on the WebSocket handshake, like any
/// other, not a 400.
#[tokio::test]
async fn an_authorization_header_that_is_not_text_gets_401() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let stack = Stack::start(one_gateway()).await;
    let addr = stack.gateways[0].addr;
    for path in ["/v1/chats", "/v1/ws"] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connecting");
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer "
        )
        .into_bytes();
        request.extend_from_slice(b"\xff\xfe\r\n\r\n");
        stream.write_all(&request).await.expect("writing the request");
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .expect("the response took too long")
            .expect("reading the response");
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 401"), "GET {path}: {response}");
    }
}
