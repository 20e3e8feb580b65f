-- Change one membership of a group: join, add, leave or remove.
--
-- KEYS: 1 chat:{chat}:meta  2 chat:{chat}:members  3 user:{user}:chats
--       4 the queue stream
-- ARGV: 1 chat  2 user (whose membership changes)  3 actor (who asks)
--       4 action: 'join' | 'add' | 'leave' | 'may_join' (the join rule
--       alone, changing nothing)  5 origin  6 version gap after a Redis
--       restart
-- Returns {'ok'} | {'already'} | {'not_found'} | {'forbidden'}
--
-- join: the actor is the user; public chats only (private: forbidden).
-- add: the actor must be a member; any visibility.
-- leave: the user stops being a member (the gateway checks actor == user).
local chat, user, actor, action = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local meta = redis.call('HMGET', KEYS[1], 'kind', 'visibility', 'mver', 'mrid')
if not meta[1] then return {'not_found'} end
if meta[1] ~= 'group' then return {'forbidden'} end
local is_member = redis.call('SISMEMBER', KEYS[2], user) == 1

local active
if action == 'leave' then
  if not is_member then return {'forbidden'} end
  active = '0'
else
  if action == 'join' or action == 'may_join' then
    if meta[2] ~= 'public' and not is_member then return {'forbidden'} end
    if action == 'may_join' then return {is_member and 'already' or 'ok'} end
  elseif redis.call('SISMEMBER', KEYS[2], actor) == 0 then
    return {'forbidden'}
  end
  if is_member then return {'already'} end
  active = '1'
end

if active == '1' then
  redis.call('SADD', KEYS[2], user)
  redis.call('SADD', KEYS[3], chat)
else
  redis.call('SREM', KEYS[2], user)
  redis.call('SREM', KEYS[3], chat)
end
-- The membership version (mver) is tagged with the run id of the Redis
-- server that last advanced it (mrid), like the seq counter (accept.lua):
-- a restart may have lost the last changes (AOF everysec) whose versions a
-- persister already stored, and PostgreSQL ignores a version it has seen
-- (store.rs), so after a restart the version jumps by the gap first. A
-- chat without mrid (restore-redis, or written before mrid existed) jumps
-- too.
local run_id = __REDIS_RUN_ID__ -- this Redis run's id, put in at load (run_script.rs)
local version = tonumber(meta[3]) or 0
if meta[3] and meta[4] ~= run_id then
  version = version + tonumber(ARGV[6])
end
version = version + 1
redis.call('HSET', KEYS[1], 'mver', version, 'mrid', run_id)
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[4], '*', 'v', '1', 'kind', 'member', 'chat', chat,
  'user', user, 'active', active, 'version', version, 'ts', ts)

-- The chat's channel tells the other members (and, for a leave, makes every
-- node drop the user's connections from the chat before any later message);
-- the user's channel tells all of the user's devices, wherever they are.
local kind = (active == '1') and 'j' or 'l'
local envelope = cmsgpack.pack({kind, ARGV[5], chat, user, '', '', 0, '', ts})
redis.call('PUBLISH', 'c:' .. chat, envelope)
redis.call('PUBLISH', 'u:' .. user, envelope)
return {'ok'}
