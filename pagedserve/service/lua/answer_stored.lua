#!lua flags=allow-oom
-- allow-oom: it grows nothing (acknowledging and deleting free memory, PUBLISH stores nothing), as the plain XACK,
-- XDEL and PUBLISH it replaces ran under maxmemory too.
-- Answer stream entries of an id that has a result already (a resubmission, a redelivery): acknowledge them,
-- publish the stored terminal event if that acknowledged one, then delete them. An entry another worker
-- acknowledged meanwhile (it took the entry over from this worker, paused, and answered it) was answered by that
-- worker's publication: one more would be a second `done` on the channel for one answer. In that order, the
-- script sent again after a refused XACK publishes once it gets past it, and after a refused XDEL does not
-- publish again.
-- KEYS[1] request stream
-- ARGV[1] consumer group, ARGV[2] event channel, ARGV[3] the stored terminal event, ARGV[4..] stream entry ids
-- Returns how many entries this call acknowledged.
local acked = 0
for i = 4, #ARGV, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if acked > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
for i = 4, #ARGV, 1000 do
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return acked
