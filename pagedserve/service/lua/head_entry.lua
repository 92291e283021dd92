#!lua flags=no-writes
-- The group's next undelivered entry, as {id, body}, or nil: none waits, or its body is missing or longer than
-- ARGV[2] bytes (read in its turn; a worker that peeks at the head must not copy a MiB out every time it looks).
--!include xinfo_fields
local last
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then last = field(group, 'last-delivered-id') end
end
if not last then return nil end
local head = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #head == 0 then return nil end
local body = field(head[1][2], 'body')
if type(body) ~= 'string' or #body > tonumber(ARGV[2]) then return nil end
return {head[1][1], body}
