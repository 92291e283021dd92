#!lua
-- Set aside a batch that a worker cannot run because its record or one of its keys is not what the service writes
-- (producers may write them): it leaves the active set, so it never again costs a worker a look or stops the
-- others, and an unfinished batch ends failed with an error naming the field. Nothing is written to a key that is
-- no batch record (missing, of the wrong type, or a hash without a status), and an ended batch keeps its status.
-- KEYS[1] record, KEYS[2] active batches
-- ARGV[1] batch id (the active set's member), ARGV[2] now (unix s), ARGV[3] the record's errors (JSON)
-- Returns 'failed' | 'ended' (it had ended: only out of the active set) | 'removed' (no record to mark)
redis.call('ZREM', KEYS[2], ARGV[1])
local status = redis.pcall('HGET', KEYS[1], 'status')
if type(status) ~= 'string' then
  return 'removed'
end
if status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired' then
  return 'ended'
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[2], 'errors', ARGV[3])
return 'failed'
