#!lua
-- Set aside a batch that a worker cannot run because its record or one of its keys is not what the service writes
-- (producers may write them): it leaves the active set, so it never again costs a worker a look or stops the
-- others, and an unfinished batch ends failed with an error naming the field. Nothing is written to a key that is
-- no batch record (missing, of the wrong type, or a hash without a status), and an ended batch keeps its status.
-- A batch record and its keys that have no expiry (a producer wrote them) are given the one the service gives a
-- batch: the retention after its completion window, from now when that cannot be read. Without it they stayed for
-- ever, and so did the id in the index of all batches, which drops only the ids whose record is gone.
-- KEYS[1] record, KEYS[2] active batches, KEYS[3..6] lines, out, inflight, entries
-- ARGV[1] batch id (the active set's member), ARGV[2] now (unix s), ARGV[3] the record's errors (JSON),
-- ARGV[4] retention (s), ARGV[5] the longest completion window (s)
-- Returns 'failed' | 'ended' (it had ended: only out of the active set) | 'removed' (no record to mark)

--!include batch_checks

redis.call('ZREM', KEYS[2], ARGV[1])
local st = redis.pcall('HMGET', KEYS[1], 'status', 'expires_at')
if st.err or type(st[1]) ~= 'string' then
  return 'removed'
end
local status = st[1]
local outcome = 'ended'
if not (status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired') then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[2], 'errors', ARGV[3])
  outcome = 'failed'
end
local now, retention = tonumber(ARGV[2]), tonumber(ARGV[4])
-- A window past the longest a batch may have is not the service's: the keys would still outlive every batch.
local window_end = math.min(count(st[2]) or now, now + tonumber(ARGV[5]))
for i = 1, 6 do
  if i ~= 2 then
    redis.call('EXPIREAT', KEYS[i], window_end + retention, 'NX')  -- NX: the service's own expiry stays
  end
end
return outcome
