-- Relay one typing event, at most one per second per sender and target
-- across the whole cluster (the key expires after the interval; a private
-- chat has one key whether it is addressed by user or by chat id).
--
-- KEYS: 1 typing:{from}:{target}  2 chat:{chat}:meta  3 chat:{chat}:members
-- ARGV: 1 from  2 to ('' when the target is a chat)  3 chat ('' for a user)
--       4 origin  5 interval (ms)
-- Returns {'ok'} | {'limited'} | {'not_found'} | {'forbidden'}
local from, to, chat = ARGV[1], ARGV[2], ARGV[3]
if chat ~= '' then
  local meta = redis.call('HMGET', KEYS[2], 'kind', 'a', 'b')
  if not meta[1] then return {'not_found'} end
  if meta[1] == 'dm' then
    -- A private chat addressed by its id: the typing goes to the other side,
    -- as its messages do, on the user's channel (no node receives `c:` of a
    -- private chat).
    if from == meta[2] then to = meta[3]
    elseif from == meta[3] then to = meta[2]
    else return {'forbidden'} end
    chat = ''
  elseif redis.call('SISMEMBER', KEYS[3], from) == 0 then
    return {'forbidden'}
  end
end
if not redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[5]), 'NX') then
  return {'limited'}
end
local envelope = cmsgpack.pack({'t', ARGV[4], chat, from, to, '', 0, '', 0})
if chat ~= '' then
  redis.call('PUBLISH', 'c:' .. chat, envelope)
else
  redis.call('PUBLISH', 'u:' .. to, envelope)
end
return {'ok'}
