#!lua flags=allow-oom
-- The group's next undelivered entry, read for consumer ARGV[2] (XREADGROUP COUNT 1 '>', as a plain read does)
-- only while the group's last-delivered-id is still ARGV[3], where head_entry.lua looked at it: a worker reads the
-- head ahead of room for what that look found, and two workers looking at once both saw the same head, so the
-- second's plain read took the entry behind it, which it had no room for. Nil where another consumer read the
-- head first (or the group is missing). Its one write, the pending entry, is what a plain read makes under
-- maxmemory too, hence allow-oom.
--!include xinfo_fields
local group = group_info(KEYS[1], ARGV[1])
if not group or field(group, 'last-delivered-id') ~= ARGV[3] then return nil end
return redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
