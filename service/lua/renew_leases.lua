#!lua flags=allow-oom
-- Renew the lease (the idle time) of the entries this consumer still owns; return the ids it lost.
-- An entry owned by another consumer was reclaimed while we were away: never steal it back.
-- allow-oom: renewing frees nothing and grows nothing; refusing it under maxmemory would let other workers
-- reclaim entries that are still running here.
-- KEYS[1] request stream; ARGV[1] consumer group, ARGV[2] consumer, ARGV[3..] entry ids
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
