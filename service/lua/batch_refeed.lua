#!lua
-- Look at one taken line that has had no output line for long: if its request is still alive (a result waits
-- to be collected, a worker holds its claim, or its stream entry is still there, pending or not yet read)
-- leave it and look again later; if its request vanished (Redis lost the entry: a restart without the last
-- writes; the entry was dead-lettered) add a new stream entry for it. The request id is the same, so a run that
-- did happen is answered from its result, never run twice.
-- KEYS[1] record, KEYS[2] lines, KEYS[3] inflight, KEYS[4] entries, KEYS[5] request stream, KEYS[6] result key,
-- KEYS[7] running (claim) key
-- ARGV[1] list index, ARGV[2] now (ms), ARGV[3] taken before (ms): only a line still that old is looked at,
-- ARGV[4] most re-feeds of one line
-- Returns 'fresh' | 'alive' | 'refed' | 'closed' (the batch takes nothing more) | 'exhausted' | 'gone'
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[3]) then
  return 'fresh'
end
local eid = redis.call('HGET', KEYS[4], ARGV[1])
local queued = eid and #redis.call('XRANGE', KEYS[5], eid, eid) > 0
if redis.call('EXISTS', KEYS[6]) == 1 or redis.call('EXISTS', KEYS[7]) == 1 or queued then
  redis.call('ZADD', KEYS[3], 'XX', ARGV[2], ARGV[1])
  return 'alive'
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'gone'
end
if status ~= 'in_progress' then
  return 'closed'
end
local body = redis.call('LINDEX', KEYS[2], ARGV[1])
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
