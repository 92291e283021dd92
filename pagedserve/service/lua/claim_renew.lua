#!lua flags=allow-oom
-- Renew the claims a worker still runs and release the ones it has answered (or given up), in one call.
-- allow-oom: a renewal grows nothing (a lapsed claim taken again is one short key) and a release frees; refused
-- under maxmemory, the claims of runs still going here would lapse and a worker holding another entry of the id
-- would start it a second time.
-- KEYS[1..n] = running keys to renew, KEYS[n+1..n+m] = running keys to release, KEYS[n+m+1..2n+m] = the result
-- keys of the renewed ids, in the same order
-- ARGV[1] = owner   ARGV[2] = TTL in ms   ARGV[3] = n   ARGV[4] = m
-- A claim that expired (Redis lost it, or this worker was away) is taken again unless another worker took it or
-- the id has a result: then another worker ran it while this one was away and answered it.
-- A key holding a value of another type (no worker's) is lost to a renewal and left alone by a release: one
-- such key must not fail the whole call, and with it every other claim's renewal.
-- A GET the ACL refuses fails the whole call (the renewal is tried again), never read as a lost claim: the
-- worker would give up runs whose claims are still its own.
-- Returns the 1-based indexes of the renewed keys this worker must stop running.
-- The counts are checked against the keys first: EVALSHA of any loaded script is open to producers (their ACL
-- allows it for their own keys, and a call without keys has none to check), and a loop bound taken from the
-- arguments alone would keep Redis busy, answering BUSY to every client, for as long as a caller asked.
--!include refusal
local lost = {}
local renew, release = tonumber(ARGV[3]), tonumber(ARGV[4])
if not renew or not release or renew < 0 or release < 0 or #KEYS ~= 2 * renew + release then
  return redis.error_reply('ERR claim_renew: ARGV[3] and ARGV[4] must count the keys given')
end
for i = 1, renew + release do
  local key = KEYS[i]
  local cur = redis.pcall('GET', key)
  if refused(cur) then
    return redis.error_reply(cur.err)
  end
  if type(cur) == 'table' and cur.err then
    if i <= renew then
      table.insert(lost, i)
    end
  elseif i <= renew then
    if cur == ARGV[1] then
      redis.call('PEXPIRE', key, ARGV[2])
    elseif cur == false and redis.call('EXISTS', KEYS[renew + release + i]) == 0 then
      redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    else
      table.insert(lost, i)
    end
  elseif cur == ARGV[1] then
    redis.call('DEL', key)
  end
end
return lost
