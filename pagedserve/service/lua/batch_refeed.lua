#!lua
-- Look at one taken line that has had no output line for long: if its request is still alive (a result waits
-- to be collected, a worker holds its claim, or its stream entry is still there, pending or not yet read)
-- leave it and look again later; if its request vanished (Redis lost the entry: a restart without the last
-- writes; the entry was dead-lettered) add a new stream entry for it. The request id is the same, so a run that
-- did happen is answered from its result, never run twice.
-- Producers may write a batch's keys: what is read is checked before the first write, and a key of the wrong
-- type or an entry id or counter the service did not write is answered 'malformed' (the worker sets the batch
-- aside) instead of a Lua error each time a worker looks.
-- KEYS[1] record, KEYS[2] lines, KEYS[3] inflight, KEYS[4] entries, KEYS[5] request stream, KEYS[6] result key,
-- KEYS[7] running (claim) key
-- ARGV[1] list index, ARGV[2] now (ms), ARGV[3] taken before (ms): only a line still that old is looked at,
-- ARGV[4] most re-feeds of one line
-- Returns 'fresh' | 'alive' | 'refed' | 'closed' (the batch takes nothing more) | 'exhausted' | 'gone'
--   | 'foreign' (its result key holds a value of another type: no worker can store the line's answer there, so
--   its request was dead-lettered, and fed again it would be each time) | {'malformed', <field or key>, <what>}

--!include batch_checks

local score, bad = read('inflight', 'sorted set', 'ZSCORE', KEYS[3], ARGV[1])
if bad then
  return bad
end
if not score or tonumber(score) > tonumber(ARGV[3]) then
  return 'fresh'
end
local eid, refeeds
eid, bad = read('entries', 'hash', 'HMGET', KEYS[4], ARGV[1], 'refeeds:' .. ARGV[1])
if bad then
  return bad
end
eid, refeeds = eid[1], eid[2]
if eid and not string.match(eid, '^%d+%-%d+$') then
  return {'malformed', 'entries', "holds '" .. string.sub(eid, 1, 40) .. "' for line " .. ARGV[1] ..
          ', not a stream entry id'}
end
if refeeds and not count(refeeds) then
  return {'malformed', 'entries', "holds '" .. string.sub(refeeds, 1, 40) .. "' as the re-feeds of line " ..
          ARGV[1] .. ', not a whole number >= 0'}
end
local queued = eid and #redis.call('XRANGE', KEYS[5], eid, eid) > 0
local result = redis.call('TYPE', KEYS[6]).ok
if result == 'string' or redis.call('EXISTS', KEYS[7]) == 1 or queued then
  redis.call('ZADD', KEYS[3], 'XX', ARGV[2], ARGV[1])
  return 'alive'
end
-- Only now: a request still queued or running decides for itself (the stray key may be gone by its end).
if result ~= 'none' then
  return 'foreign'
end
local st
st, bad = read('record', 'hash', 'HMGET', KEYS[1], 'status', 'refeeds')
if bad then
  return bad
end
if not st[1] then
  return 'gone'
end
if st[1] ~= 'in_progress' then
  return 'closed'
end
if st[2] and not count(st[2]) then
  return {'malformed', 'refeeds', "is '" .. string.sub(st[2], 1, 40) .. "', not a whole number >= 0"}
end
local body
body, bad = read('lines', 'list', 'LINDEX', KEYS[2], ARGV[1])
if bad then
  return bad
end
if not body then
  return 'gone'
end
local times = redis.call('HINCRBY', KEYS[4], 'refeeds:' .. ARGV[1], 1)
if times > tonumber(ARGV[4]) then
  return 'exhausted'
end
redis.call('HINCRBY', KEYS[1], 'refeeds', 1)
local new = redis.call('XADD', KEYS[5], '*', 'body', body)
redis.call('HSET', KEYS[4], ARGV[1], new)
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 'refed'
