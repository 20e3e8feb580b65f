-- Fill a chat's recent-message cache with its latest stored messages.
--
-- KEYS: 1 chat:{chat}:recent  2 chat:{chat}:recent:floor
-- ARGV: 1 cache size  2 ttl (s)  3 the floor these rows prove (0 when they
--       are the whole chat, else the lowest seq among them)
--       4.. seq, entry pairs
-- The floor only moves down (more is known complete), except that trimming
-- to the cache size raises it to the lowest entry kept. A cache written
-- before a Redis restart is dropped first (see accept.lua).
local run_id = __REDIS_RUN_ID__ -- this Redis run's id, put in at load (run_script.rs)
local old = redis.call('HMGET', KEYS[2], 'f', 'rid')
local floor = tonumber(ARGV[3])
if old[2] == run_id and old[1] and redis.call('EXISTS', KEYS[1]) == 1 then
  if tonumber(old[1]) < floor then floor = tonumber(old[1]) end
else
  redis.call('DEL', KEYS[1])
end
for i = 4, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
end
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
