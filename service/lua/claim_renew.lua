#!lua
-- Renew the claims a worker still runs and release the ones it has answered (or given up), in one call.
-- KEYS[1..ARGV[3]] = running keys to renew; the KEYS after them = running keys to release
-- ARGV[1] = owner   ARGV[2] = TTL in ms   ARGV[3] = how many of KEYS are renewed
-- A claim that expired (Redis lost it, or this worker was away) is taken again unless another worker took it.
-- Returns the 1-based indexes of the renewed keys another worker holds now: this worker must stop those runs.
local lost = {}
local renew = tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if i <= renew then
    if cur == ARGV[1] then
      redis.call('PEXPIRE', key, ARGV[2])
    elseif cur == false then
      redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    else
      table.insert(lost, i)
    end
  elseif cur == ARGV[1] then
    redis.call('DEL', key)
  end
end
return lost
