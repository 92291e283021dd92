#!lua
-- Delete a consumer from the group, only if no live worker has its name and no entry is pending with it: deleting a
-- consumer drops its pending entries from the group for good, so one with any is kept (they are reclaimed first,
-- and a later pass deletes it). A worker that is alive after all lists its consumer again with its next name
-- renewal (refresh_name.lua).
-- KEYS[1] request stream, KEYS[2] the consumer-name lease key; ARGV[1] consumer group, ARGV[2] consumer
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if type(pending) ~= 'table' or pending.err or #pending > 0 then
  return 0
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
