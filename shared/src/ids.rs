//! Ids: users, chats and messages are UUIDs in canonical lowercase text.
//!
//! The private chat of two users has an id both can compute without asking
//! the server (contract: Chats): UUIDv5 in the URL namespace of
//! `dm:<smaller id>:<larger id>`, ids compared as text.

use uuid::Uuid;

/// A user is whoever holds a token whose `sub` is this id.
pub type UserId = Uuid;
/// A chat: a group created over HTTP, or the private chat of two users.
pub type ChatId = Uuid;
/// A message id: UUIDv7 assigned at acceptance, or the client's own `id`.
pub type MessageId = Uuid;

/// The id of the private chat between `a` and `b` (in either order).
pub fn private_chat_id(a: UserId, b: UserId) -> ChatId {
    let (a, b) = (a.to_string(), b.to_string());
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("dm:{lo}:{hi}").as_bytes())
}

/// A fresh, time-ordered message or chat id.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_chat_id_is_symmetric_and_follows_the_contract() {
        let a: Uuid = "00000000-0000-0000-0000-000000000001".parse().unwrap();
        let b: Uuid = "ffffffff-0000-0000-0000-000000000002".parse().unwrap();
        assert_eq!(private_chat_id(a, b), private_chat_id(b, a));
        let expected = Uuid::new_v5(
            &"6ba7b811-9dad-11d1-80b4-00c04fd430c8".parse().unwrap(),
            format!("dm:{a}:{b}").as_bytes(),
        );
        assert_eq!(private_chat_id(b, a), expected);
        assert_eq!(private_chat_id(a, a).get_version_num(), 5);
    }
}
