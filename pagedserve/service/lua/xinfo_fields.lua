-- A field of a flat XINFO reply ({name, value, name, value, ...}), or nil. Not a script of its own:
-- scripts.source puts this text where a script says --!include xinfo_fields.
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
