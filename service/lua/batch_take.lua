#!lua
-- Take the next lines of a batch: each becomes a request stream entry in this same script, and the cursor moves
-- past it, so no line is taken twice (by any worker) and no taken line is missing from the stream.
-- A batch past its completion window becomes expiring here instead, so nothing is taken after it. It is not
-- expired yet: lines taken before may still be running; batch_collect.lua ends it when every line has its
-- output line, as it ends a cancelling batch.
-- KEYS[1] record, KEYS[2] lines, KEYS[3] inflight, KEYS[4] entries, KEYS[5] request stream
-- ARGV[1] most lines to take, ARGV[2] now (ms)
-- Returns {'taken', n} | {'drained'} (nothing left to take) | {'expiring'} | {<status>} | {'gone'}
local st = redis.call('HMGET', KEYS[1], 'status', 'cursor', 'lines', 'expires_at', 'retain_until')
if not st[1] then
  return {'gone'}
end
if st[1] ~= 'in_progress' then
  return {st[1]}
end
local now = tonumber(ARGV[2])
if tonumber(st[4]) * 1000 <= now then
  redis.call('HSET', KEYS[1], 'status', 'expiring')
  return {'expiring'}
end
local cursor = tonumber(st[2])
local n = tonumber(st[3])
if cursor >= n then
  return {'drained'}
end
local last = math.min(n, cursor + tonumber(ARGV[1])) - 1
local bodies = redis.call('LRANGE', KEYS[2], cursor, last)
for i, body in ipairs(bodies) do
  local index = cursor + i - 1
  local eid = redis.call('XADD', KEYS[5], '*', 'body', body)
  redis.call('ZADD', KEYS[3], now, index)
  redis.call('HSET', KEYS[4], index, eid)
end
redis.call('HSET', KEYS[1], 'cursor', cursor + #bodies)
redis.call('EXPIREAT', KEYS[3], st[5])
redis.call('EXPIREAT', KEYS[4], st[5])
return {'taken', #bodies}
