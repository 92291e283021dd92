#!lua flags=allow-oom
-- Refresh the consumer-name lease only if it is still ours (or lapsed); 1 if held, 0 if another worker has it.
-- allow-oom: like the entry leases, losing the name under maxmemory would let a second worker take it.
-- KEYS[1] consumer-name key; ARGV[1] this worker's token, ARGV[2] lease (ms)
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
