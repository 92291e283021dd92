#!lua
-- Take the next lines of a batch: each becomes a request stream entry in this same script, and the cursor moves
-- past it, so no line is taken twice (by any worker) and no taken line is missing from the stream.
-- A batch past its completion window becomes expiring here instead, so nothing is taken after it. It is not
-- expired yet: lines taken before may still be running; batch_collect.lua ends it when every line has its
-- output line, as it ends a cancelling batch.
-- Producers may write a batch's keys, so every number read is checked and every key's type too, all before the
-- first write: a record the service did not write is answered 'malformed' (the worker sets the batch aside)
-- instead of a Lua error each time a worker looks, or a half-done take.
-- KEYS[1] record, KEYS[2] lines, KEYS[3] inflight, KEYS[4] entries, KEYS[5] request stream
-- ARGV[1] most lines to take, ARGV[2] now (ms)
-- Returns {'taken', n} | {'drained'} (nothing left to take) | {'expiring'} | {<status>} | {'gone'}
--   | {'malformed', <field or key>, <what is wrong with it>}

--!include batch_checks

local st, bad = read('record', 'hash', 'HMGET', KEYS[1], 'status', 'cursor', 'lines', 'expires_at', 'retain_until')
if bad then
  return bad
end
if not st[1] then
  return {'gone'}
end
if st[1] ~= 'in_progress' then
  return {st[1]}
end
local n, malformed = counts({'cursor', 'lines', 'expires_at', 'retain_until'}, st, 1)
if malformed then
  return malformed
end
local now = tonumber(ARGV[2])
if n.expires_at * 1000 <= now then
  redis.call('HSET', KEYS[1], 'status', 'expiring')
  return {'expiring'}
end
local cursor = n.cursor
if cursor >= n.lines then
  return {'drained'}
end
local _
_, bad = read('inflight', 'sorted set', 'ZSCORE', KEYS[3], '0')
if bad then
  return bad
end
_, bad = read('entries', 'hash', 'HGET', KEYS[4], '0')
if bad then
  return bad
end
local last = math.min(n.lines, cursor + tonumber(ARGV[1])) - 1
local bodies
bodies, bad = read('lines', 'list', 'LRANGE', KEYS[2], cursor, last)
if bad then
  return bad
end
if #bodies == 0 then
  -- taking nothing while the record says lines are left would look like progress forever, and a batch that
  -- took lines is the last looked at in that tick: no batch after it would be fed
  return {'malformed', 'lines', 'holds ' .. cursor .. ' lines or fewer, the record says ' .. n.lines}
end
for i, body in ipairs(bodies) do
  local index = cursor + i - 1
  local eid = redis.call('XADD', KEYS[5], '*', 'body', body)
  redis.call('ZADD', KEYS[3], now, index)
  redis.call('HSET', KEYS[4], index, eid)
end
redis.call('HSET', KEYS[1], 'cursor', cursor + #bodies)
redis.call('EXPIREAT', KEYS[3], n.retain_until)
redis.call('EXPIREAT', KEYS[4], n.retain_until)
return {'taken', #bodies}
