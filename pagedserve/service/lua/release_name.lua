#!lua
-- Give the consumer-name lease up at shutdown, only if it is still ours.
-- KEYS[1] consumer-name key; ARGV[1] this worker's token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
