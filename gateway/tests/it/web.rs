//! The browser client's files and the development sign-in (gateway::web):
//! served at `/` and `/assets/`; `POST /v1/dev/login` only with
//! `CHAT_DEV_LOGIN=1`, 404 otherwise; the API around them unchanged.

use reqwest::Method;
use serde_json::json;

use crate::harness::{Stack, StackOptions};

#[tokio::test]
async fn the_client_is_served_and_the_dev_sign_in_is_off_unless_asked_for() {
    let mut stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let api = stack.http(0);

    // Off by default: 404 like any unknown path, whatever the method.
    let (status, body) = api
        .request(Method::POST, "/v1/dev/login", None, Some(json!({"name": "alice"})))
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    assert_eq!(api.request(Method::GET, "/v1/dev/login", None, None).await.0, 404);

    // The client's files, with the headers that keep it fresh and confined.
    let base = stack.gateways[0].http_url();
    let index = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(index.status().as_u16(), 200);
    assert!(index.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(index.headers()["cache-control"], "no-cache");
    assert!(index.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    assert!(index.text().await.unwrap().contains("/assets/app.js"));
    let script = reqwest::get(format!("{base}/assets/app.js")).await.unwrap();
    assert_eq!(script.status().as_u16(), 200);
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));
    assert_eq!(api.get_text("/assets/no-such-file.js").await.0, 404);
    assert_eq!(api.get_text("/assets/../Cargo.toml").await.0, 404);

    // The API around it is as it was.
    let (status, body) = api.request(Method::GET, "/v1/chats", None, None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(api.get_text("/healthz").await.0, 200);

    // On: a token for a name; the same name is the same user.
    let on = stack.add_gateway(&[("CHAT_DEV_LOGIN", "1")]).await;
    let api = stack.http(on);
    let (status, alice) = api
        .request(Method::POST, "/v1/dev/login", None, Some(json!({"name": "Alice"})))
        .await;
    assert_eq!(status, 200, "{alice}");
    let (_, again) = api
        .request(Method::POST, "/v1/dev/login", None, Some(json!({"name": "alice"})))
        .await;
    assert_eq!(alice["user"], again["user"]);
    assert_eq!(alice["name"], "Alice");
    let user: uuid::Uuid = alice["user"].as_str().unwrap().parse().unwrap();
    assert_eq!(user, gateway::web::dev_user_id("alice"));
    let token = alice["token"].as_str().unwrap();
    let (status, chats) = api.request(Method::GET, "/v1/chats", Some(token), None).await;
    assert_eq!((status, chats), (200, json!([])));
    stack
        .try_connect_query(on, Some(token))
        .await
        .expect("the token opens a WebSocket");

    let (status, body) = api
        .request(Method::POST, "/v1/dev/login", None, Some(json!({"name": "  "})))
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
}
