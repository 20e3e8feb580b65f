//! The HTTP surface: routes, authentication of requests, the chats REST API
//! and history, operations endpoints, and the mapping of every failure to a
//! status and a contract error code.
//!
//! Error bodies are `{"code": "<contract code>", "message": "..."}`; a
//! missing or bad token is 401 with code `unauthorized`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use shared::ids::{new_id, ChatId, UserId};
use shared::protocol::{ErrorCode, Visibility};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::auth::{token_from, Identity};
use crate::chats::ChatError;
use crate::history::{Window, DEFAULT_LIMIT, MAX_LIMIT};
use crate::limits::ConnRefused;
use crate::ws::upgrade::{Handshake, NotWebSocket};
use crate::ws::{self, OpenError};
use crate::Services;

/// The most members a chat can be created with in one request.
const MAX_INITIAL_MEMBERS: usize = 1000;
const MAX_TITLE_CHARS: usize = 200;
const MAX_JSON_BODY: u64 = 256 * 1024;

/// A refusal, as the HTTP API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: code.as_str(),
            message: message.into(),
        }
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> ApiError {
        ApiError::new(e.code(), e.to_string())
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = warp::reply::json(&json!({"code": self.code, "message": self.message}));
        warp::reply::with_status(body, self.status).into_response()
    }
}

type Answer = Result<Response, ApiError>;

fn answer(result: Answer) -> Response {
    result.unwrap_or_else(Reply::into_response)
}

/// Every route of the gateway.
pub fn routes(svc: Arc<Services>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let verifier = svc.verifier.clone();
    let web = crate::web::routes(&svc.config);
    let identity = move || identity(verifier.clone());
    let with = move || {
        let svc = svc.clone();
        warp::any().map(move || svc.clone())
    };

    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply().into_response());
    let readyz = warp::path!("readyz").and(warp::get()).and(with()).then(readyz);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with())
        .map(|svc: Arc<Services>| {
            warp::reply::with_header(svc.metrics.render(), "content-type", "text/plain; version=0.0.4").into_response()
        });

    let ws = warp::path!("v1" / "ws")
        .and(warp::get())
        .and(with())
        .and(identity())
        .and(warp::header::optional::<String>("origin"))
        .and(ws::upgrade::handshake())
        .then(upgrade);

    let create = warp::path!("v1" / "chats")
        .and(warp::post())
        .and(with())
        .and(identity())
        .and(json_body())
        .then(|svc, who, body| async move { answer(create_chat(svc, who, body).await) });
    let list = warp::path!("v1" / "chats")
        .and(warp::get())
        .and(with())
        .and(identity())
        .then(|svc, who| async move { answer(list_chats(svc, who).await) });
    let add = warp::path!("v1" / "chats" / String / "members")
        .and(warp::post())
        .and(with())
        .and(identity())
        .and(json_body())
        .then(|chat, svc, who, body| async move { answer(add_member(svc, who, chat, body).await) });
    let remove = warp::path!("v1" / "chats" / String / "members" / String)
        .and(warp::delete())
        .and(with())
        .and(identity())
        .then(|chat, user, svc, who| async move { answer(remove_member(svc, who, chat, user).await) });
    let history = warp::path!("v1" / "chats" / String / "messages")
        .and(warp::get())
        .and(with())
        .and(identity())
        .and(warp::query::<HashMap<String, String>>())
        .then(|chat, svc, who, query| async move { answer(history(svc, who, chat, query).await) });

    healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .or(ws)
        .unify()
        .or(create)
        .unify()
        .or(list)
        .unify()
        .or(add)
        .unify()
        .or(remove)
        .unify()
        .or(history)
        .unify()
        .or(web)
        .unify()
        .recover(recover)
        .unify()
}

/// The caller's identity from `Authorization: Bearer` or `?token=`; 401 otherwise.
fn identity(verifier: crate::auth::Verifier) -> impl Filter<Extract = (Identity,), Error = Rejection> + Clone {
    // The raw value: one that is not text is a malformed token (401), which
    // warp's typed `header::optional` would reject as a bad request.
    let authorization = warp::header::value("authorization")
        .map(|value: warp::http::HeaderValue| Some(value.to_str().unwrap_or_default().to_owned()))
        .or(warp::any().map(|| None))
        .unify();
    authorization
        .and(
            warp::query::<HashMap<String, String>>()
                .or(warp::any().map(HashMap::new))
                .unify(),
        )
        .and(warp::any().map(move || verifier.clone()))
        .and_then(
            |header: Option<String>, query: HashMap<String, String>, verifier: crate::auth::Verifier| async move {
                token_from(header.as_deref(), query.get("token").map(String::as_str))
                    .and_then(|token| verifier.verify(&token))
                    .map_err(|e| warp::reject::custom(Unauthorized(e.to_string())))
            },
        )
}

#[derive(Debug)]
struct Unauthorized(String);
impl warp::reject::Reject for Unauthorized {}

#[derive(Debug)]
struct BadJson(String);
impl warp::reject::Reject for BadJson {}

fn json_body() -> impl Filter<Extract = (serde_json::Value,), Error = Rejection> + Clone {
    warp::body::content_length_limit(MAX_JSON_BODY)
        .and(warp::body::bytes())
        .and_then(|body: Bytes| async move {
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| warp::reject::custom(BadJson(e.to_string())))
        })
}

async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(Unauthorized(msg)) = rejection.find() {
        ApiError::unauthorized(msg.clone())
    } else if let Some(NotWebSocket(msg)) = rejection.find() {
        ApiError::bad_request(*msg)
    } else if let Some(BadJson(msg)) = rejection.find() {
        ApiError::bad_request(format!("body is not valid JSON: {msg}"))
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(ErrorCode::TooLarge, "request body too large")
    } else if rejection.is_not_found() {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such endpoint".into(),
        }
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "bad_request",
            message: "method not allowed".into(),
        }
    } else {
        ApiError::bad_request(format!("{rejection:?}"))
    };
    Ok(error.into_response())
}

/// Ready when the node can serve: not draining, Redis answers, and this
/// node's clock is not so far behind Redis's that every send is refused
/// (`clock`).
async fn readyz(svc: Arc<Services>) -> Response {
    let not_ready = |why: String| {
        warp::reply::with_status(format!("not ready: {why}"), StatusCode::SERVICE_UNAVAILABLE).into_response()
    };
    if svc.shutdown.is_cancelled() {
        return not_ready("draining".into());
    }
    match svc.clock.check().await {
        Err(e) => not_ready(e.to_string()),
        Ok(offset) if offset.refuses_sends() => not_ready(format!(
            "this node's clock is {} ms behind Redis's, more than the {} ms a send may take to reach the queue: \
             every send is refused; fix its NTP",
            offset.ms,
            crate::queue::ACCEPT_DEADLINE_MS
        )),
        Ok(_) => warp::reply::with_status("ready".to_string(), StatusCode::OK).into_response(),
    }
}

async fn upgrade(svc: Arc<Services>, who: Identity, origin: Option<String>, handshake: Handshake) -> Response {
    // Cross-site WebSocket hijacking: with an allowlist, a page of another
    // site cannot open a socket from a user's browser. Clients that are not
    // browsers send no Origin and are not affected.
    let allowed = &svc.config.allowed_origins;
    if let Some(origin) = origin {
        if !allowed.is_empty() && !allowed.iter().any(|a| a == origin.trim_end_matches('/')) {
            return ApiError::new(ErrorCode::Forbidden, format!("origin {origin:?} is not allowed")).into_response();
        }
    }
    let config = ws::upgrade::socket_config(svc.config.max_frame_bytes);
    let tracker = svc.sessions.clone();
    match ws::open(svc, who).await {
        Ok(session) => handshake.accept(config, move |socket| tracker.track_future(session.run(socket))),
        Err(OpenError::Refused(ConnRefused::User)) => ApiError::new(
            ErrorCode::RateLimited,
            "too many connections for this user on this node",
        )
        .into_response(),
        Err(
            e @ (OpenError::Draining
            | OpenError::Unavailable
            | OpenError::TimedOut(_)
            | OpenError::Refused(ConnRefused::Node)),
        ) => ApiError::new(ErrorCode::Unavailable, e.to_string()).into_response(),
    }
}

/// Each user's REST calls are limited per node (`GATEWAY_REST_RATE`).
fn rest_rate(svc: &Services, who: &Identity) -> Result<(), ApiError> {
    if svc.limits.rest.allow(who.user) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::RateLimited, "too many requests; slow down"))
    }
}

fn parse_id(text: &str, what: &str) -> Result<uuid::Uuid, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{what} is not a UUID: {text:?}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewChat {
    title: String,
    visibility: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_chat(svc: Arc<Services>, who: Identity, body: serde_json::Value) -> Answer {
    rest_rate(&svc, &who)?;
    let new: NewChat = serde_json::from_value(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let title = new.title.trim().to_string();
    if title.is_empty() || title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::bad_request(format!(
            "title must be 1 to {MAX_TITLE_CHARS} characters"
        )));
    }
    if !shared::protocol::storable(&title) {
        return Err(ApiError::bad_request(
            "title contains the NUL character (U+0000), which cannot be stored",
        ));
    }
    let visibility = Visibility::parse(&new.visibility)
        .ok_or_else(|| ApiError::bad_request("visibility must be \"public\" or \"private\""))?;
    if new.members.len() > MAX_INITIAL_MEMBERS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_INITIAL_MEMBERS} members at creation"
        )));
    }
    let mut members: Vec<UserId> = vec![who.user];
    for m in &new.members {
        let m = parse_id(m, "member")?;
        if !members.contains(&m) {
            members.push(m);
        }
    }
    let chat = new_id();
    svc.chats
        .create(chat, &title, visibility.as_str(), &members, "http")
        .await?;
    let body = json!({"id": chat, "title": title, "visibility": visibility.as_str(), "members": members});
    Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::CREATED).into_response())
}

async fn list_chats(svc: Arc<Services>, who: Identity) -> Answer {
    rest_rate(&svc, &who)?;
    let chats = svc.chats.list(who.user).await?;
    Ok(warp::reply::json(&chats).into_response())
}

async fn add_member(svc: Arc<Services>, who: Identity, chat: String, body: serde_json::Value) -> Answer {
    rest_rate(&svc, &who)?;
    let chat = parse_id(&chat, "chat")?;
    let user = body
        .get("user")
        .and_then(|u| u.as_str())
        .ok_or_else(|| ApiError::bad_request("body must be {\"user\": <user id>}"))?;
    let user = parse_id(user, "user")?;
    svc.chats.add(chat, user, who.user, "http").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn remove_member(svc: Arc<Services>, who: Identity, chat: String, user: String) -> Answer {
    rest_rate(&svc, &who)?;
    let chat = parse_id(&chat, "chat")?;
    let user = parse_id(&user, "user")?;
    if user != who.user {
        // Say nothing of a chat the caller cannot see.
        svc.chats.check_access(chat, who.user).await?;
        return Err(ApiError::new(ErrorCode::Forbidden, "a user may remove only themselves"));
    }
    svc.chats.leave(chat, user, "http").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn history(svc: Arc<Services>, who: Identity, chat: String, query: HashMap<String, String>) -> Answer {
    rest_rate(&svc, &who)?;
    let chat: ChatId = parse_id(&chat, "chat")?;
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if n >= 1 => n.min(MAX_LIMIT),
            // A number too large for i64 is still above the maximum.
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => MAX_LIMIT,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be a positive integer, got {l:?}"
                )))
            }
        },
    };
    let after = query.get("after").map(|a| parse_id(a, "after")).transpose()?;
    let before = query.get("before").map(|b| parse_id(b, "before")).transpose()?;
    svc.chats.check_access(chat, who.user).await?;
    let after = match after {
        Some(id) => Some(position(&svc, chat, id, "after").await?),
        None => None,
    };
    let before = match before {
        Some(id) => Some(position(&svc, chat, id, "before").await?),
        None => None,
    };
    let window = Window {
        after: after.map(|(seq, _)| seq),
        before: before.map(|(seq, _)| seq),
        before_ts: before.map(|(_, ts)| ts),
        limit,
    };
    let messages = svc
        .history
        .read(chat, window)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    Ok(warp::reply::json(&json!({ "messages": messages.as_slice() })).into_response())
}

/// The position (`seq`) and `ts` of cursor message `id`: from its
/// idempotency record in Redis while it lasts (which also covers a message
/// accepted but not stored yet), else from PostgreSQL. A cursor found in
/// neither is a bad request only when Redis answered: one it could not ask
/// may name a message still in the queue, and the client must retry rather
/// than drop its cursor.
async fn position(svc: &Services, chat: ChatId, id: uuid::Uuid, which: &str) -> Result<(i64, i64), ApiError> {
    let in_redis = svc.chats.position_of(chat, id).await;
    if let Ok(Some(at)) = in_redis {
        return Ok(at);
    }
    let stored = svc
        .history
        .position_of(chat, id)
        .await
        .map_err(|e| ApiError::new(e.code(), e.to_string()))?;
    match (stored, in_redis) {
        (Some(at), _) => Ok(at),
        (None, Err(e)) => Err(e.into()),
        (None, Ok(_)) => Err(ApiError::bad_request(format!(
            "`{which}` names no message of this chat"
        ))),
    }
}
