-- Fill a chat's recent-message cache with its latest stored messages.
--
-- KEYS: 1 chat:{chat}:recent  2 chat:{chat}:recent:floor  3 chat:{chat}:seq
-- ARGV: 1 cache size  2 ttl (s)  3.. seq, entry pairs, oldest first: the
--       chat's latest rows in PostgreSQL
-- Returns the floor written, or -1 when the rows prove nothing new and the
-- cache was left as it was.
--
-- PostgreSQL lags the accept script: a message in the queue is in the cache
-- only if the cache was valid when it was accepted, and in PostgreSQL only
-- once a persister has stored it. So the floor (from which seq on the set
-- holds every message) may only come down over seqs this script can account
-- for, walking down from what the set already proves (a valid cache: its
-- floor; else the chat's counter n, above which there is nothing) through
-- the rows: each row must be the next seq down, or the seqs in between must
-- have been skipped by a Redis restart (below). The first row that does not
-- connect (a message still in the queue, stored by another persister lane
-- later, dead-lettered, or lost) ends the walk; rows under it are not added,
-- so the set never holds an entry below its floor. A cold cache whose newest
-- seq is not yet stored stays cold: reads keep going to PostgreSQL until the
-- persister has caught up.
--
-- Seqs skipped by a restart: after a Redis restart the accept script jumps
-- the counter from p to j (CHAT_SEQ_RESTART_GAP + 1 on) and records p and j
-- in the counter's hash. Seqs strictly between p and j are either messages
-- the restarted Redis forgot but a persister had stored (rows, taken like
-- any other) or were never given. While the counter still carries another
-- run's id (no message since the restart), the jump is still to come, and
-- rows above n are such forgotten messages: a cold cache takes them. Only the
-- last jump is recorded; an earlier one ends the walk like a gap. (Messages
-- of the lost window that only a persister's memory still held are the loss
-- window of docs/architecture.md, Ordering.)
local run_id = __REDIS_RUN_ID__ -- this Redis run's id, put in at load (run_script.rs)
local old = redis.call('HMGET', KEYS[2], 'f', 'rid')
local counter = redis.call('HMGET', KEYS[3], 'n', 'rid', 'p', 'j')
local n = tonumber(counter[1]) or 0
if not counter[1] and #ARGV > 2 then
  -- Stored messages but no counter: a Redis that lost its data (outside the
  -- guarantees, docs/architecture.md); nothing here can be proven.
  return -1
end

local skip_from, skip_to = tonumber(counter[3]), tonumber(counter[4])
-- Whether no message can have a seq strictly between lo and hi.
local function nothing_between(lo, hi)
  return hi == lo + 1 or (skip_from ~= nil and lo >= skip_from and hi <= skip_to)
end

local valid = old[2] == run_id and old[1] ~= false and redis.call('EXISTS', KEYS[1]) == 1
-- The set (with the rows taken so far) holds every message from low on.
local low = valid and tonumber(old[1]) or n + 1
if low == 0 then
  -- The whole chat is cached already.
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
  return 0
end
local add = {}
for i = #ARGV - 1, 3, -2 do
  local seq = tonumber(ARGV[i])
  if seq >= low then
    -- In a valid set already. In a cold one, above the counter: stored
    -- messages a restarted Redis forgot (its counter still the old run's).
    if not valid then
      add[#add + 1] = seq
      add[#add + 1] = ARGV[i + 1]
    end
  elseif nothing_between(seq, low) then
    low = seq
    add[#add + 1] = seq
    add[#add + 1] = ARGV[i + 1]
  else
    break
  end
end
-- Nothing at or below the counter connected to it: a cold cache stays cold.
if not valid and low > n and n > 0 then return -1 end
if valid and #add == 0 then return -1 end

if not valid then redis.call('DEL', KEYS[1]) end
for i = 1, #add, 500 do
  redis.call('ZADD', KEYS[1], unpack(add, i, math.min(i + 499, #add)))
end
-- From the first seq on, the set holds the whole chat.
local floor = (low <= 1) and 0 or low
local size = tonumber(ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
if count > size then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, count - size - 1)
  floor = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
end
redis.call('HSET', KEYS[2], 'f', floor, 'rid', run_id)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return floor
