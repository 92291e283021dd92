-- Checks shared by the batch scripts that workers run (take, collect, refeed, fail): producers may write the batch
-- keys, so every number and key type is checked before a script's first write. Not a script of its own:
-- scripts.source puts this text where a script says --!include batch_checks.

-- A whole number >= 0 as the service writes one, or nil (missing, text, '1e3', ' 5', too big for exact math).
local function count(v)
  if type(v) == 'string' and #v <= 15 and string.match(v, '^%d+$') then
    return tonumber(v)
  end
  return nil
end
local function what(v)
  return v and ("is '" .. string.sub(v, 1, 40) .. "', not a whole number >= 0") or 'is missing'
end
-- A read of one of the batch's keys: a key of the wrong type is the batch's fault (nil and the reply); any other
-- error (an ACL refusal) is raised as it is, since it is no fault of the batch.
local function read(name, kind, ...)
  local got = redis.pcall(...)
  if type(got) == 'table' and got.err then
    if string.sub(got.err, 1, 9) == 'WRONGTYPE' then
      return nil, {'malformed', name, 'is not a ' .. kind}
    end
    error(got)
  end
  return got
end
-- The counts ``names`` of ``values`` from index ``from + 1`` on, by name; or nil and the malformed reply.
local function counts(names, values, from)
  local n = {}
  for i, name in ipairs(names) do
    n[name] = count(values[i + from])
    if not n[name] then
      return nil, {'malformed', name, what(values[i + from])}
    end
  end
  return n
end
