-- May this user read this chat? The access rule of the contract's Chats
-- section, for history and any other read.
--
-- KEYS: 1 chat:{chat}:meta  2 chat:{chat}:members
-- ARGV: 1 user
-- Returns 'ok' | 'not_found' | 'forbidden'
local meta = redis.call('HMGET', KEYS[1], 'kind', 'a', 'b')
if not meta[1] then return 'not_found' end
if meta[1] == 'dm' then
  if ARGV[1] == meta[2] or ARGV[1] == meta[3] then return 'ok' end
  return 'forbidden'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'ok' end
return 'forbidden'
