#!lua
-- Claim a request id for one worker, unless it has a result already or another live worker runs it.
-- One script, so that "no result yet" and "claimed" are one atomic step: a worker that stores the result
-- between the two can never be followed by a second run.
-- KEYS[1] = {prefix}:result:{id}   KEYS[2] = {prefix}:running:{id}
-- ARGV[1] = owner (consumer name and a per-process token)   ARGV[2] = TTL in ms
-- Returns {'result', <stored terminal event>} | {'claimed'} | {'held', <owner>}
local stored = redis.call('GET', KEYS[1])
if stored then
  return {'result', stored}
end
local owner = redis.call('GET', KEYS[2])
-- A claim without a TTL is no worker's (workers always set one) and would never lapse: it is taken over like a
-- lapsed one. PEXPIRE NX answers 1 only for a key without a TTL (Redis 7; PEXPIRE is in the worker's ACL).
if owner == false or owner == ARGV[1] or redis.call('PEXPIRE', KEYS[2], ARGV[2], 'NX') == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'claimed'}
end
return {'held', owner}
