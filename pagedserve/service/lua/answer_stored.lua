#!lua flags=allow-oom
-- allow-oom: it grows nothing (acknowledging and deleting free memory, PUBLISH stores nothing), as the plain XACK,
-- XDEL and PUBLISH it replaces ran under maxmemory too.
-- Answer stream entries of an id that has a result already (a resubmission, a redelivery): acknowledge and delete
-- them, and publish the stored terminal event only if one of them was still unacknowledged. An entry another
-- worker acknowledged meanwhile (it took the entry over from this worker, paused, and answered it) was answered by
-- that worker's publication: one more would be a second `done` on the channel for one answer.
-- KEYS[1] request stream
-- ARGV[1] consumer group, ARGV[2] event channel, ARGV[3] the stored terminal event, ARGV[4..] stream entry ids
-- Returns how many entries this call acknowledged.
local acked = 0
for i = 4, #ARGV, 1000 do
  local last = math.min(i + 999, #ARGV)
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, last))
end
if acked > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return acked
