#!lua flags=allow-oom
-- Take or refresh the consumer-name lease unless another live worker holds it. Returns 1 if held (ours, lapsed
-- or free), 2 if taken over from a value no worker wrote, 0 if another worker has it.
-- A worker's value is its token (32 lowercase hex digits) and always has a TTL: a value without a TTL (it would
-- never lapse) or in another format is no worker's; refusing the name for it would stop the worker for good.
-- PEXPIRE NX answers 1 only for a key without a TTL (Redis 7; PEXPIRE is in the worker's ACL).
-- allow-oom: like the entry leases, losing the name under maxmemory would let a second worker take it.
-- KEYS[1] consumer-name key; ARGV[1] this worker's token, ARGV[2] lease (ms)
local cur = redis.call('GET', KEYS[1])
local held = 1
if cur ~= false and cur ~= ARGV[1] then
  if #cur == 32 and not string.find(cur, '[^0-9a-f]') and redis.call('PEXPIRE', KEYS[1], ARGV[2], 'NX') == 0 then
    return 0
  end
  held = 2
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return held
