//! The gateway's REST API, one method per endpoint of the contract. Every
//! method acts as a user (a token minted with the stack's secret) and
//! returns the status and the body (JSON when it parses, else a string,
//! `null` when empty), so tests assert on refusals as easily as on success.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{mint_token, now_secs, DEFAULT_TIMEOUT};

pub struct Api {
    base: String,
    secret: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: String, secret: String) -> Api {
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("building an HTTP client");
        Api { base, secret, http }
    }

    fn token(&self, user: Uuid) -> String {
        mint_token(&self.secret, user, now_secs() + 3600)
    }

    /// `POST /v1/chats`
    pub async fn create_chat(&self, user: Uuid, title: &str, visibility: &str, members: &[Uuid]) -> (u16, Value) {
        let members: Vec<String> = members.iter().map(Uuid::to_string).collect();
        let body = json!({ "title": title, "visibility": visibility, "members": members });
        self.request(Method::POST, "/v1/chats", Some(&self.token(user)), Some(body))
            .await
    }

    /// `POST /v1/chats/{chat}/members`
    pub async fn add_member(&self, user: Uuid, chat: Uuid, member: Uuid) -> (u16, Value) {
        let path = format!("/v1/chats/{chat}/members");
        let body = json!({ "user": member.to_string() });
        self.request(Method::POST, &path, Some(&self.token(user)), Some(body))
            .await
    }

    /// `DELETE /v1/chats/{chat}/members/{member}`
    pub async fn remove_member(&self, user: Uuid, chat: Uuid, member: Uuid) -> (u16, Value) {
        let path = format!("/v1/chats/{chat}/members/{member}");
        self.request(Method::DELETE, &path, Some(&self.token(user)), None).await
    }

    /// `GET /v1/chats`
    pub async fn list_chats(&self, user: Uuid) -> (u16, Value) {
        self.request(Method::GET, "/v1/chats", Some(&self.token(user)), None)
            .await
    }

    /// `GET /v1/chats/{chat}/messages?{query}`; `query` like
    /// `"after=<id>&limit=10"`, or `""`.
    pub async fn history(&self, user: Uuid, chat: Uuid, query: &str) -> (u16, Value) {
        let mut path = format!("/v1/chats/{chat}/messages");
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        self.request(Method::GET, &path, Some(&self.token(user)), None).await
    }

    /// The whole history of `chat` as `user` sees it, oldest first: pages
    /// backwards (`before=`) 500 at a time. On a status other than 200,
    /// that status and the messages read so far.
    pub async fn history_all(&self, user: Uuid, chat: Uuid) -> (u16, Vec<Value>) {
        let mut pages: Vec<Vec<Value>> = Vec::new();
        let mut query = "limit=500".to_string();
        loop {
            let (status, body) = self.history(user, chat, &query).await;
            if status != 200 {
                return (status, pages.into_iter().rev().flatten().collect());
            }
            let page = body["messages"].as_array().cloned().unwrap_or_default();
            let oldest = page.first().map(|m| m["id"].as_str().unwrap_or_default().to_string());
            let full = page.len() == 500;
            pages.push(page);
            match oldest {
                Some(id) if full => query = format!("limit=500&before={id}"),
                _ => return (200, pages.into_iter().rev().flatten().collect()),
            }
        }
    }

    /// Any request, with `Authorization: Bearer <token>` when given.
    pub async fn request(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let (status, text) = self.request_text(method, path, token, body).await;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// `GET path` without a token, body as text: `/healthz`, `/readyz`,
    /// `/metrics`.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        self.request_text(Method::GET, path, None, None).await
    }

    async fn request_text(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
        (status, text)
    }
}
