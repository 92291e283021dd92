#!lua flags=allow-oom
-- Take or refresh the consumer-name lease unless another live worker holds it. Returns 1 if held (ours, lapsed
-- or free), 2 if taken over from a value no worker wrote, 0 if another worker has it.
-- A worker's value is its token (32 lowercase hex digits) and always has a TTL: a value without a TTL (it would
-- never lapse) or in another format is no worker's; refusing the name for it would stop the worker for good.
-- PEXPIRE NX answers 1 only for a key without a TTL (Redis 7; PEXPIRE is in the worker's ACL).
-- allow-oom: like the entry leases, losing the name under maxmemory would let a second worker take it.
-- A lease that was not ours (lapsed or free) may mean another worker's cleanup deleted this consumer from the group
-- meanwhile (forget_consumer.lua deletes only consumers whose lease is gone, after a long pause say): it is listed
-- again at once, since Redis 7.0 lists a blocked reader only when an entry is delivered to it, and a client that
-- finds no consumer alive says no worker runs. pcall: a group that is gone, or an ACL without the command, only
-- leaves it unlisted.
-- KEYS[1] consumer-name key, KEYS[2] request stream; ARGV[1] this worker's token, ARGV[2] lease (ms), ARGV[3]
-- consumer group, ARGV[4] consumer
local cur = redis.call('GET', KEYS[1])
local held = 1
if cur ~= false and cur ~= ARGV[1] then
  if #cur == 32 and not string.find(cur, '[^0-9a-f]') and redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX') == 0 then
    return 0
  end
  held = 2
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if cur ~= ARGV[1] then
  redis.pcall('XGROUP', 'CREATECONSUMER', KEYS[2], ARGV[3], ARGV[4])
end
return held
