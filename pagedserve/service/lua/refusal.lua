-- Whether a redis.pcall reply is a refusal (the ACL denies the command, ...): an error other than WRONGTYPE. A
-- WRONGTYPE error says the key holds a value of another type, which no worker writes; a refusal is raised again
-- (redis.error_reply) so that the caller waits and sends the script again. Not a script of its own:
-- scripts.source puts this text where a script says --!include refusal.
local function refused(reply)
  return type(reply) == 'table' and reply.err and not string.find(reply.err, 'WRONGTYPE', 1, true)
end
