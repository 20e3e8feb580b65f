-- Initial schema: chats, their members, and their messages.
--
-- Timestamps are milliseconds since the Unix epoch (bigint), as in the queue
-- jobs and the client contract. There is deliberately no foreign key from
-- messages (or chat_members) to chats: the chat row of a private chat and its
-- first message are separate queue entries that different persisters may
-- store in either order.

CREATE TABLE chats (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('group', 'dm')),
    title       text NOT NULL DEFAULT '',
    visibility  text NOT NULL CHECK (visibility IN ('public', 'private')),
    created_by  uuid NOT NULL,
    created_at  bigint NOT NULL
);

-- One row per (chat, user) ever seen; `active` says whether the user is a
-- member now. `version` orders a chat's membership changes so that the newest
-- wins whatever order the persisters apply them in.
CREATE TABLE chat_members (
    chat        uuid NOT NULL,
    user_id     uuid NOT NULL,
    active      boolean NOT NULL,
    version     bigint NOT NULL,
    updated_at  bigint NOT NULL,
    PRIMARY KEY (chat, user_id)
);

-- "Which chats is this user in?"
CREATE INDEX chat_members_user_active ON chat_members (user_id) WHERE active;

CREATE TABLE messages (
    id          uuid PRIMARY KEY,
    chat        uuid NOT NULL,
    seq         bigint NOT NULL,
    sender      uuid NOT NULL,
    recipient   uuid,
    body        text NOT NULL,
    ts          bigint NOT NULL
);

-- History in chat order; also refuses two messages at one position.
CREATE UNIQUE INDEX messages_chat_seq ON messages (chat, seq);
