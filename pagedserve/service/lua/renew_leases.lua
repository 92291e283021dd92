#!lua flags=allow-oom
-- Renew the lease (the idle time) of the entries this consumer still owns. Returns {lost, gone, refused}: the ids
-- another consumer owns now (reclaimed while we were away: never steal them back), the ids no consumer owns (the
-- entry left the pending list without an ack: trimmed or deleted from the stream, or Redis lost its data), and,
-- when Redis refused a command (an ACL without XPENDING or XCLAIM), {command, error}: the entries from there on
-- are neither lost nor gone, only not renewed this time. A gone entry has nothing to renew; its request stays
-- with the worker that holds the id's claim.
-- allow-oom: renewing frees nothing and grows nothing; refusing it under maxmemory would let other workers
-- reclaim entries that are still running here.
-- KEYS[1] request stream; ARGV[1] consumer group, ARGV[2] consumer, ARGV[3..] entry ids
local lost, gone = {}, {}
for i = 3, #ARGV do
  -- pcall: without the stream or the group (NOGROUP: Redis lost its data) every entry is gone
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if type(p) == 'table' and p.err and string.sub(p.err, 1, 7) ~= 'NOGROUP' then
    return {lost, gone, {'XPENDING', p.err}}
  end
  if type(p) ~= 'table' or p.err or #p == 0 then
    table.insert(gone, ARGV[i])
  elseif p[1][2] == ARGV[2] then
    -- An entry deleted from the stream leaves the pending list here (Redis 7); the next renewal finds it gone.
    local c = redis.pcall('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    if type(c) == 'table' and c.err then
      return {lost, gone, {'XCLAIM', c.err}}
    end
  else
    table.insert(lost, ARGV[i])
  end
end
return {lost, gone, {}}
