#!lua flags=allow-oom
-- Set the group's read counter right when it has been delivered every entry the stream ever had: Redis 7.0/7.2
-- keep counting lag from a counter that entries deleted ahead of the group (the workers delete what they answer)
-- or a reload leaves wrong, and then report a backlog on an empty stream for good (KEDA would scale on it, and
-- producers could not tell a lost request). With the group's last-delivered ID the stream's last-generated one,
-- nothing is undelivered: lag 0, by setting entries-read to entries-added. One script, so no XADD comes between.
-- allow-oom: it grows nothing.
-- KEYS[1] request stream; ARGV[1] consumer group
-- Returns the lag Redis reported where it set it right (-1: it reported none), else 0
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
--!include xinfo_fields
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local g = group_info(KEYS[1], ARGV[1])
if not g then return 0 end
local lag, last = field(g, 'lag'), field(g, 'last-delivered-id')
if lag == 0 or last ~= field(info, 'last-generated-id') then return 0 end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', field(info, 'entries-added'))
if not lag then return -1 end
return lag
