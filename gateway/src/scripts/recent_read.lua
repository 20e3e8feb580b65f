-- Read a window of a chat's recent-message cache.
--
-- KEYS: 1 chat:{chat}:recent  2 chat:{chat}:recent:floor
-- ARGV: 1 'after' (oldest first from the lower bound) or 'latest' (newest
--       first from the upper bound)  2 lower bound seq, exclusive ('' none)
--       3 upper bound seq, exclusive ('' none)  4 limit  5 ttl (s)
-- Returns {} when there is no usable cache, else
-- {floor, {entry, seq, entry, seq, ...}}.
local floor = redis.call('HMGET', KEYS[2], 'f', 'rid')
if not floor[1] then return {} end
local run_id = __REDIS_RUN_ID__ -- this Redis run's id, put in at load (run_script.rs)
if floor[2] ~= run_id then return {} end
local lo = (ARGV[2] == '') and '-inf' or ('(' .. ARGV[2])
local hi = (ARGV[3] == '') and '+inf' or ('(' .. ARGV[3])
local rows
if ARGV[1] == 'after' then
  rows = redis.call('ZRANGEBYSCORE', KEYS[1], lo, hi, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
else
  rows = redis.call('ZREVRANGEBYSCORE', KEYS[1], hi, lo, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
end
-- Reading a chat keeps it warm.
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return {floor[1], rows}
