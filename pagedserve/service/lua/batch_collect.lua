#!lua
-- Store output lines of a batch, one per input line (HSETNX: the first writer wins, a second collector of the
-- same line changes nothing), count them, and end the batch when every line has its output line.
-- Optionally moves the take cursor (closing untaken lines of a cancelled or expired batch), only from where the
-- caller read it, so two closers never skip a line.
-- Producers may write a batch's keys: the counters and the types of the keys are checked before the first write,
-- and a batch that can never end (every line taken, none running, yet the counts short of the total) is found
-- here, where that is seen in one instant; either is answered 'malformed' (the worker sets the batch aside).
-- KEYS[1] record, KEYS[2] out, KEYS[3] inflight, KEYS[4] entries, KEYS[5] active batches
-- ARGV[1] now (unix s), ARGV[2] batch id, ARGV[3] cursor read ('' = leave it), ARGV[4] new cursor,
-- ARGV[5..] groups of four: line number, output line, '1' succeeded / '0' failed / 'e' expired (its request
--   ended at the completion window), list index ('' = not taken)
-- Returns {output lines stored that succeeded, that failed} | {'malformed', <field or key>, <what is wrong>}

--!include batch_checks

local r, bad = read('record', 'hash', 'HMGET', KEYS[1], 'status', 'total', 'completed', 'failed', 'retain_until',
                    'cursor', 'lines')
if bad then
  return bad
end
if not r[1] then
  return {0, 0}  -- the batch is gone (its retention ended): an output line would outlive it
end
local n, malformed = counts({'total', 'completed', 'failed', 'retain_until'}, r, 1)
if malformed then
  return malformed
end
local checks = {{'out', 'hash', 'HGET', KEYS[2], '0'}, {'inflight', 'sorted set', 'ZSCORE', KEYS[3], '0'},
                {'entries', 'hash', 'HGET', KEYS[4], '0'}}
for _, c in ipairs(checks) do
  local _
  _, bad = read(unpack(c))
  if bad then
    return bad
  end
end

local added, ok, failed, expired = 0, 0, 0, false
if ARGV[3] ~= '' and r[6] == ARGV[3] then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[4])
end
for i = 5, #ARGV, 4 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    added = added + 1
    if ARGV[i + 2] == '1' then
      ok = ok + 1
    else
      failed = failed + 1
      expired = expired or ARGV[i + 2] == 'e'
    end
  end
  if ARGV[i + 3] ~= '' then
    redis.call('ZREM', KEYS[3], ARGV[i + 3])
    redis.call('HDEL', KEYS[4], ARGV[i + 3])
  end
end
if ok > 0 then
  redis.call('HINCRBY', KEYS[1], 'completed', ok)
end
if failed > 0 then
  redis.call('HINCRBY', KEYS[1], 'failed', failed)
end
if added > 0 then
  redis.call('EXPIREAT', KEYS[2], n.retain_until)
end
-- A line that ended at the window: the batch is past it, expiring as a take would have marked it (none may come:
-- every line taken, or no seat free), so that it ends expired rather than completed.
if expired and r[1] == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'expiring')
  r[1] = 'expiring'
end
-- expired: a record of an older version, which marked it expired at once
local final = {in_progress = 'completed', cancelling = 'cancelled', expiring = 'expired', expired = 'expired'}
local to = final[r[1]]
if to then
  local done = n.completed + ok + n.failed + failed
  if done >= n.total then
    if to == 'completed' then  -- as OpenAI's: only a batch on its way to completed passes through finalizing
      redis.call('HSET', KEYS[1], 'status', to, 'finalizing_at', ARGV[1], to .. '_at', ARGV[1])
    elseif to ~= r[1] then
      redis.call('HSET', KEYS[1], 'status', to, to .. '_at', ARGV[1])
    end
    redis.call('ZREM', KEYS[5], ARGV[2])
  else
    -- Every line taken (a closer moves the cursor too) and none in flight: each taken line was collected with
    -- its count in one script, so the counts add up to the total, unless the record was not the service's.
    local cursor = redis.call('HGET', KEYS[1], 'cursor')
    local lines = count(r[7])
    if count(cursor) and lines and count(cursor) >= lines and #redis.call('ZRANGE', KEYS[3], 0, 0) == 0 then
      return {'malformed', 'total', 'is ' .. n.total .. ' but the batch has ' .. done ..
              ' output lines and no line left to take or running'}
    end
  end
end
return {ok, failed}
