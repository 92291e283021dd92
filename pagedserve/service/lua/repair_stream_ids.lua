#!lua flags=allow-oom
-- allow-oom: it grows nothing (it sets a stream's and a group's last IDs), so it need not wait for room: producers'
-- XADD * works again as soon as Redis has room for their entries, not only after the next try of this script.
-- KEYS[1] request stream; ARGV[1] consumer group, ARGV[2] now (ms, the worker's clock), ARGV[3] bound (ms)
-- Returns 0: nothing to do; 1: waiting for a far-future entry to leave the stream; {2, old last ID, new last ID}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
--!include xinfo_fields
local function ms(id) return tonumber(string.match(id, '^(%d+)')) end
local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[2]) + tonumber(ARGV[3])
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last = field(info, 'last-generated-id')
if ms(last) <= limit then return 0 end
local new = string.format('%d-0', now)
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top == 1 then
  if ms(top[1][1]) > limit then return 1 end
  if less(new, top[1][1]) then new = top[1][1] end
end
redis.call('XSETID', KEYS[1], new, 'MAXDELETEDID', new)
local g = group_info(KEYS[1], ARGV[1])
if g and less(new, field(g, 'last-delivered-id')) then
  -- every entry ever added is at or below the new ID and was read: the group's lag is 0, not unknown
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], new, 'ENTRIESREAD', field(info, 'entries-added'))
end
return {2, last, new}
