#!lua
-- Store output lines of a batch, one per input line (HSETNX: the first writer wins, a second collector of the
-- same line changes nothing), count them, and end the batch when every line has its output line.
-- Optionally moves the take cursor (closing untaken lines of a cancelled or expired batch), only from where the
-- caller read it, so two closers never skip a line.
-- KEYS[1] record, KEYS[2] out, KEYS[3] inflight, KEYS[4] entries, KEYS[5] active batches
-- ARGV[1] now (unix s), ARGV[2] batch id, ARGV[3] cursor read ('' = leave it), ARGV[4] new cursor,
-- ARGV[5..] groups of four: line number, output line, '1' succeeded / '0' failed, list index ('' = not taken)
-- Returns {output lines stored that succeeded, that failed}.
local added, ok, bad = 0, 0, 0
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'cursor') == ARGV[3] then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[4])
end
for i = 5, #ARGV, 4 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    added = added + 1
    if ARGV[i + 2] == '1' then
      ok = ok + 1
      redis.call('HINCRBY', KEYS[1], 'completed', 1)
    else
      bad = bad + 1
      redis.call('HINCRBY', KEYS[1], 'failed', 1)
    end
  end
  if ARGV[i + 3] ~= '' then
    redis.call('ZREM', KEYS[3], ARGV[i + 3])
    redis.call('HDEL', KEYS[4], ARGV[i + 3])
  end
end
local r = redis.call('HMGET', KEYS[1], 'status', 'total', 'completed', 'failed', 'retain_until')
if r[1] and tonumber(r[3]) + tonumber(r[4]) >= tonumber(r[2]) then
  -- expired: a record of an older version, which marked it expired at once
  local final = {in_progress = 'completed', cancelling = 'cancelled', expiring = 'expired', expired = 'expired'}
  local to = final[r[1]]
  if to then
    if to ~= r[1] then
      redis.call('HSET', KEYS[1], 'status', to, 'finalizing_at', ARGV[1], to .. '_at', ARGV[1])
    end
    redis.call('ZREM', KEYS[5], ARGV[2])
  end
end
if added > 0 and r[5] then
  redis.call('EXPIREAT', KEYS[2], r[5])
end
return {ok, bad}
