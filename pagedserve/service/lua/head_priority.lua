#!lua flags=no-writes
-- The priority the group's next undelivered entry asks for, as text, or nil: none waits, it names none (the
-- default), or its body cannot be read here (it is read in its turn and answered then). Found by text, not by
-- decoding a body of up to a MiB inside Redis: a "priority" key written with escapes, or one inside a prompt,
-- is misread, which costs at most one entry read early or one better request left to wait its turn.
--!include xinfo_fields
local last
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then last = field(group, 'last-delivered-id') end
end
if not last then return nil end
local head = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #head == 0 then return nil end
local body = field(head[1][2], 'body')
if type(body) ~= 'string' then return nil end
return string.match(body, '"priority"%s*:%s*(%-?%d+)[%s,}]')
