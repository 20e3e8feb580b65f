-- Create a group chat with its first members.
--
-- KEYS: 1 chat:{chat}:meta  2 chat:{chat}:members  3 the queue stream
--       4.. user:{member}:chats for each member, in ARGV order
-- ARGV: 1 chat  2 title  3 visibility  4 creator  5 origin  6.. members
--       (the creator first, no duplicates)
-- Returns {'ok', ts}
--
-- The chat's id is new, so its membership version starts here: member i
-- (1-based) gets version i, and the version is tagged with this Redis run
-- (mrid; see membership.lua).
local chat, title, visibility, creator = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local run_id = __REDIS_RUN_ID__ -- this Redis run's id, put in at load (run_script.rs)
local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'kind', 'group', 'title', title,
  'visibility', visibility, 'created_by', creator, 'created_at', ts,
  'mver', #ARGV - 5, 'mrid', run_id)
redis.call('XADD', KEYS[3], '*', 'v', '1', 'kind', 'chat', 'chat', chat,
  'chat_kind', 'group', 'title', title, 'visibility', visibility,
  'created_by', creator, 'ts', ts)
for i = 6, #ARGV do
  local member = ARGV[i]
  redis.call('SADD', KEYS[2], member)
  redis.call('SADD', KEYS[i - 2], chat)
  local version = i - 5
  redis.call('XADD', KEYS[3], '*', 'v', '1', 'kind', 'member', 'chat', chat,
    'user', member, 'active', '1', 'version', version, 'ts', ts)
  redis.call('PUBLISH', 'u:' .. member,
    cmsgpack.pack({'j', ARGV[5], chat, member, '', '', 0, '', ts}))
end
return {'ok', ts}
