-- The chats of one user, groups and private chats, for GET /v1/chats.
--
-- KEYS: 1 user:{user}:chats  2 user:{user}:dms
-- ARGV: 1 the prefix of chat keys ('chat:')
-- Returns a flat array: id, kind, title, visibility, a, b for each chat.
local out = {}
for _, set in ipairs({KEYS[1], KEYS[2]}) do
  for _, chat in ipairs(redis.call('SMEMBERS', set)) do
    local m = redis.call('HMGET', ARGV[1] .. chat .. ':meta', 'kind', 'title', 'visibility', 'a', 'b')
    if m[1] then
      table.insert(out, chat)
      table.insert(out, m[1])
      table.insert(out, m[2] or '')
      table.insert(out, m[3] or 'private')
      table.insert(out, m[4] or '')
      table.insert(out, m[5] or '')
    end
  end
end
return out
