#!lua flags=no-writes
-- The group's next undelivered entry, as {last-delivered-id, what}: 'none' (none waits), 'same' (the group's
-- last-delivered-id is still ARGV[3], where the caller saw the head before, and its lag is known: it has not read
-- past the head since, and no entry after its last-delivered-id was deleted (an XDEL there leaves the lag
-- unknown), so it is that head still, not copied out again), 'refused' (its body is missing or longer than ARGV[4],
-- the workers' max_message_bytes: refused when read), 'unread' (its body is longer than ARGV[2] bytes: read in
-- its turn), or 'body' followed by the body. Nil where the group is missing.
--!include xinfo_fields
local group = group_info(KEYS[1], ARGV[1])
if not group then return nil end
local last, lag = field(group, 'last-delivered-id'), field(group, 'lag')
if last == ARGV[3] and lag then return {last, 'same'} end
local head = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #head == 0 then return {last, 'none'} end
local body = field(head[1][2], 'body')
if type(body) ~= 'string' or #body > tonumber(ARGV[4]) then return {last, 'refused'} end
if #body > tonumber(ARGV[2]) then return {last, 'unread'} end
return {last, 'body', body}
