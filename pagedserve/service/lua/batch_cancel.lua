#!lua
-- Cancel a batch: an in-progress batch becomes cancelling (nothing more is taken: the take script checks the
-- status), and the taken lines not yet collected are returned so the caller can cancel their requests.
-- KEYS[1] record, KEYS[2] inflight
-- ARGV[1] now (unix s)
-- Returns {<status after>, <list index>...}, or {} when there is no such batch.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return {}
end
if status == 'in_progress' or status == 'validating' then
  status = 'cancelling'
  redis.call('HSET', KEYS[1], 'status', status, 'cancelling_at', ARGV[1])
end
local out = {status}
if status == 'cancelling' then
  for _, index in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    out[#out + 1] = index
  end
end
return out
