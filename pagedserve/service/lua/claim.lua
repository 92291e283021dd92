#!lua
-- Claim a request id for one worker, unless it has a result already or another live worker runs it.
-- One script, so that "no result yet" and "claimed" are one atomic step: a worker that stores the result
-- between the two can never be followed by a second run.
-- KEYS[1] = {prefix}:result:{id}   KEYS[2] = {prefix}:running:{id}
-- ARGV[1] = owner (consumer name and a per-process token)   ARGV[2] = TTL in ms
-- Returns {'result', <stored terminal event>} | {'claimed'} | {'held', <owner>} | {'foreign', <key>}
-- 'foreign': the key holds a value of another type, which no worker writes (and GET cannot read): the caller
-- answers the id instead of waiting on it for ever. Any other error of GET (the ACL denies it) is a refusal and
-- is raised as one: the caller waits as for any refused claim, where taking it for another type would
-- dead-letter a request that has done nothing wrong.
--!include refusal
local stored = redis.pcall('GET', KEYS[1])
if refused(stored) then
  return redis.error_reply(stored.err)
end
if type(stored) == 'table' and stored.err then
  return {'foreign', KEYS[1]}
end
if stored then
  return {'result', stored}
end
local owner = redis.pcall('GET', KEYS[2])
if refused(owner) then
  return redis.error_reply(owner.err)
end
if type(owner) == 'table' and owner.err then
  return {'foreign', KEYS[2]}
end
-- A claim without a TTL is no worker's (workers always set one) and would never lapse: it is taken over like a
-- lapsed one. PEXPIRE NX answers 1 only for a key without a TTL (Redis 7; PEXPIRE is in the worker's ACL). So is
-- one that would outlive any worker's claim (an hour, or ten of this worker's TTLs if longer): workers renew
-- theirs a TTL at a time.
if owner == false or owner == ARGV[1] or redis.call('PEXPIRE', KEYS[2], ARGV[2], 'NX') == 1
    or redis.call('PTTL', KEYS[2]) > math.max(10 * tonumber(ARGV[2]), 3600000) then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'claimed'}
end
return {'held', owner}
