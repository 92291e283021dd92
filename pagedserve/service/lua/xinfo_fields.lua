-- A field of a flat XINFO reply ({name, value, name, value, ...}), or nil; and a group's. Not a script of its own:
-- scripts.source puts this text where a script says --!include xinfo_fields.
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
-- Group `name` of stream `key`, as its flat XINFO GROUPS entry, or nil.
local function group_info(key, name)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    if field(g, 'name') == name then return g end
  end
end
