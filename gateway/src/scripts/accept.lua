-- Accept one message: the single atomic step that makes a `send` durable.
--
-- In one script, so no other command interleaves: check the idempotency
-- record, check access, assign the chat's next seq, append the job to the
-- durable queue, record the idempotency key, and publish for delivery. The
-- stream order and the publication order of a chat are therefore its seq
-- order, whichever gateway ran the script.
--
-- It also appends the message to the chat's recent-message cache (a sorted
-- set scored by seq, trimmed to the newest entries), so history can serve it
-- as soon as the ack is out.
--
-- Every Redis call here costs a few µs of the one Redis core all gateways
-- share, so the script makes as few as it can (docs/benchmarks.md).
--
-- KEYS: 1 msg:{id}  2 chat:{chat}:meta  3 chat:{chat}:members  4 chat:{chat}:seq
--       5 the queue stream  6 user:{from}:dms  7 user:{to}:dms
--       8 chat:{chat}:recent  9 chat:{chat}:recent:floor
-- ARGV: 1 id  2 chat  3 from  4 to ('' for a group send)  5 body
--       6 idempotency ttl (s)  7 seq gap after a Redis restart  8 origin
--       9 'dm' or 'group'  10 ts (ms)  11 the cache entry (MessagePack, without
--       seq)  12 cache size (0: no cache)  13 cache ttl (s)
--       14, 15 where a recipient goes into the cache entry (queue.rs,
--       RecipientSlot): 14 the entry's map header with `to`, then the bytes
--       before the recipient's id; 15 the 1-based position in ARGV[11]
--       ('' when the gateway has none)  16 the accept deadline (ms)
-- Returns {'ok', chat, seq, ts, to} | {'dup', chat, seq, ts, to}
--       | {'conflict'} | {'not_found'} | {'forbidden'} | {'late', ms}
local id, chat, from, to, body = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

-- The idempotency record stays a hash: a one-string record would be cheaper
-- by one call, but gateways of the previous version (during a rolling
-- upgrade, or after a rollback) read it with HMGET.
local prev = redis.call('HMGET', KEYS[1], 'from', 'chat', 'seq', 'ts', 'to')
if prev[1] then
  if prev[1] ~= from then return {'conflict'} end
  return {'dup', prev[2], prev[3], prev[4], prev[5] or ''}
end

-- Redis 7.0 (Debian 12's) turns a Lua number it is given into text with
-- "%.17g" at every call, so the numbers the hot path passes on go as text, made once (ts as
-- the gateway sent it, seq with string.format): 4-8 % of the script's Redis
-- time (docs/benchmarks.md).
local ts, ts_text = tonumber(ARGV[10]), ARGV[10]
local TRIM_EVERY = 16

-- A message is queued no later than the deadline after its `ts` (the
-- gateway's clock when it sent the call), by Redis's clock: a call Redis
-- gets to later (a stall, a pause) is refused, and nothing is accepted. So
-- a queue entry's id time is at most `ts` + the deadline, which is how
-- history tells a hole a message still in the queue will fill from one for
-- good (gateway/src/history/holes.rs).
local now = redis.call('TIME')
local late = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ts
if late > tonumber(ARGV[16]) then return {'late', tostring(late)} end

if ARGV[9] == 'group' then
  local meta = redis.call('HMGET', KEYS[2], 'kind', 'a', 'b')
  if not meta[1] then return {'not_found'} end
  if meta[1] == 'dm' then
    -- A private chat addressed by its id: the recipient is the other side.
    if from == meta[2] then to = meta[3]
    elseif from == meta[3] then to = meta[2]
    else return {'forbidden'} end
  elseif redis.call('SISMEMBER', KEYS[3], from) == 0 then
    return {'forbidden'}
  end
elseif redis.call('EXISTS', KEYS[2]) == 0 then
  -- The first message of a private chat brings the chat into being.
  redis.call('HSET', KEYS[2], 'kind', 'dm', 'a', from, 'b', to,
    'title', '', 'visibility', 'private', 'created_by', from, 'created_at', ts_text)
  redis.call('SADD', KEYS[6], chat)
  redis.call('SADD', KEYS[7], chat)
  redis.call('XADD', KEYS[5], '*', 'v', '1', 'kind', 'chat', 'chat', chat,
    'chat_kind', 'dm', 'title', '', 'visibility', 'private',
    'created_by', from, 'ts', ts_text)
end

-- The chat's counter is tagged with the run id of the Redis server that last
-- advanced it. A different run id means Redis restarted since, and may have
-- lost its last writes (AOF everysec), including increments whose messages a
-- persister already stored: jump ahead by a gap larger than any number of
-- messages one chat can receive in the loss window, so no seq is reused.
-- The jump is recorded (p: the counter before it, j: the first seq after
-- it), so a cache refill knows the seqs in between hold no message still in
-- the queue (recent_fill.lua).
local run_id = __REDIS_RUN_ID__ -- this Redis run's id, put in at load (run_script.rs)
local counter = redis.call('HMGET', KEYS[4], 'n', 'rid')
local seq = tonumber(counter[1]) or 0
local jumped = counter[1] and counter[2] ~= run_id
if jumped then seq = seq + tonumber(ARGV[7]) + 1 else seq = seq + 1 end
local seq_text = string.format('%d', seq)
if jumped then
  redis.call('HSET', KEYS[4], 'n', seq_text, 'rid', run_id, 'p', counter[1], 'j', seq_text)
else
  redis.call('HSET', KEYS[4], 'n', seq_text, 'rid', run_id)
end

redis.call('XADD', KEYS[5], '*', 'v', '1', 'kind', 'message', 'id', id,
  'chat', chat, 'seq', seq_text, 'from', from, 'to', to, 'body', body, 'ts', ts_text)
redis.call('HSET', KEYS[1], 'from', from, 'chat', chat, 'seq', seq_text, 'ts', ts_text, 'to', to)
redis.call('EXPIRE', KEYS[1], ARGV[6])

-- The recent cache. Its floor hash says from which seq on the set holds
-- every message of the chat (f, 0: from the very first one) and under which
-- Redis run it was written (rid): a cache from before a restart may have lost
-- entries a persister already stored, so it starts over.
local size, cache_ttl = tonumber(ARGV[12]), tonumber(ARGV[13])
local entry = ARGV[11]
if to ~= '' and ARGV[4] == '' then
  -- A private chat addressed by its id: the gateway wrote the entry without
  -- a recipient; put it in (as 16 bytes), so the entry is the one any other
  -- writer encodes for this message. No slot: drop the cache (as below).
  if ARGV[14] ~= '' then
    local raw = (string.gsub(to, '-', ''))
    raw = (string.gsub(raw, '%x%x', function(h) return string.char(tonumber(h, 16)) end))
    local at = tonumber(ARGV[15])
    entry = string.sub(ARGV[14], 1, 1) .. string.sub(entry, 2, at - 1)
      .. string.sub(ARGV[14], 2) .. raw .. string.sub(entry, at)
  else
    size = 0
  end
end
if size > 0 then
  local cached_rid = redis.call('HGET', KEYS[9], 'rid')
  local fresh = cached_rid ~= run_id or redis.call('EXISTS', KEYS[8]) == 0
  if fresh then
    redis.call('DEL', KEYS[8])
    redis.call('HSET', KEYS[9], 'f', (seq == 1) and '0' or seq_text, 'rid', run_id)
  end
  redis.call('ZADD', KEYS[8], seq_text, entry)
  -- Trimmed every TRIM_EVERY-th seq, not on every message: the set holds
  -- up to size + TRIM_EVERY - 1 entries, and the floor moves with a trim.
  -- The TTL is renewed then too, and when the cache starts: two calls less
  -- on the other messages (8 % of the script's Redis time,
  -- docs/benchmarks.md). A cache idle for the TTL since its last renewal
  -- expires and starts over from the next message, as after any expiry.
  if seq % TRIM_EVERY == 0 then
    if redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -size - 1) > 0 then
      redis.call('HSET', KEYS[9], 'f', redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')[2])
    end
    fresh = true
  end
  if fresh then
    redis.call('EXPIRE', KEYS[8], cache_ttl)
    redis.call('EXPIRE', KEYS[9], cache_ttl)
  end
else
  -- This node keeps no cache (or has no way to write this entry): drop the
  -- chat's, so that nodes which do keep one never serve a window that lacks
  -- this message.
  redis.call('DEL', KEYS[8], KEYS[9])
end

local envelope = cmsgpack.pack({'m', ARGV[8], chat, from, to, id, seq, body, ts})
if to == '' then
  redis.call('PUBLISH', 'c:' .. chat, envelope)
else
  redis.call('PUBLISH', 'u:' .. to, envelope)
  if to ~= from then redis.call('PUBLISH', 'u:' .. from, envelope) end
end
return {'ok', chat, seq, ts, to}
