-- Acknowledge stream entries args[first..] of an answered id, publish its terminal event `event` on `channel` if
-- `always` or if that acknowledged one, then delete them; returns how many it acknowledged. In that order, a call
-- sent again after a refused XACK publishes once it gets past it, and after a refused XDEL does not publish again;
-- an entry another worker acknowledged meanwhile (it took the entry over and answered it) was answered by that
-- worker's publication, and one more would be a second terminal event on the channel for one answer. In chunks:
-- unpack() of more than a few thousand values fails ("too many results to unpack"), and an id submitted that many
-- times must still be acknowledged. A refused PUBLISH stops the call with an error that starts UNPUBLISHED: the
-- caller sends it again with `always` set, since what the refused call acknowledged cannot be acknowledged twice
-- and would otherwise never be published. A refused XDEL after this call published stops it with an error that
-- starts PUBLISHED: the caller sends it again without `always`, and the end is not published a second time. Not a
-- script of its own: scripts.source puts this text where a script says --!include answer_entries.
local function answer_entries(key, group, args, first, channel, event, always)
  local acked = 0
  for i = first, #args, 1000 do
    acked = acked + redis.call('XACK', key, group, unpack(args, i, math.min(i + 999, #args)))
  end
  local published = false
  if always or acked > 0 then
    local sent = redis.pcall('PUBLISH', channel, event)
    if type(sent) == 'table' and sent.err then
      return redis.error_reply('UNPUBLISHED ' .. sent.err)
    end
    published = true
  end
  for i = first, #args, 1000 do
    local deleted = redis.pcall('XDEL', key, unpack(args, i, math.min(i + 999, #args)))
    if type(deleted) == 'table' and deleted.err then
      return redis.error_reply((published and 'PUBLISHED ' or '') .. deleted.err)
    end
  end
  return acked
end
