#!lua flags=allow-oom
-- Renew the lease (the idle time) of the entries this consumer still owns. Returns {lost, gone}: the ids another
-- consumer owns now (reclaimed while we were away: never steal them back) and the ids no consumer owns (the
-- entry left the pending list without an ack: trimmed or deleted from the stream, or Redis lost its data). A
-- gone entry has nothing to renew; its request stays with the worker that holds the id's claim.
-- allow-oom: renewing frees nothing and grows nothing; refusing it under maxmemory would let other workers
-- reclaim entries that are still running here.
-- KEYS[1] request stream; ARGV[1] consumer group, ARGV[2] consumer, ARGV[3..] entry ids
local lost, gone = {}, {}
for i = 3, #ARGV do
  -- pcall: without the stream or the group (Redis lost its data) every entry is gone
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if type(p) ~= 'table' or p.err or #p == 0 then
    table.insert(gone, ARGV[i])
  elseif p[1][2] == ARGV[2] then
    -- An entry deleted from the stream leaves the pending list here (Redis 7); the next renewal finds it gone.
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return {lost, gone}
