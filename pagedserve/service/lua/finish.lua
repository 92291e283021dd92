#!lua
-- Store a request's terminal event, append it to the request's events stream, acknowledge its stream entries,
-- publish the event, and delete the entries.
-- One script, so Redis either runs all of it or refuses it up front (OOM, read-only replica: a script with a
-- shebang and without the no-writes flag is checked before it starts). The SET comes first: if the ACL denies
-- a later command, Redis stops there and keeps what ran before it, so the result is stored, never the other way
-- round: the entry stays pending (XACK denied) or, with only XDEL denied, is acknowledged but left in the stream.
-- First writer wins (SET NX): a worker that lost a race publishes the stored event, never its own.
-- One publication per answer: the call that stores the event publishes it, and otherwise a call publishes the
-- stored one only if its XACK acknowledged an entry. So this very script sent again (its reply lost to a broken
-- connection or a timeout, and the publisher repeats what it cannot know was applied) publishes only if the first
-- try stopped before publishing (an XACK refused for a while); and a run whose entries another worker took over
-- and acknowledged while this one was away was answered by that worker's publication, not again now.
-- The events stream expires with the result: a client reading it from its last entry finds the end there.
-- Fenced by the id's claim: a worker that was away (paused, partitioned) while another worker took its run over
-- stores nothing and acknowledges nothing, even when this script reaches Redis long after it was sent (bytes
-- held in a half-open connection): the claim's owner stores the answer. A claim that lapsed with no new owner
-- does not hold it back: nobody else runs the id then, and a worker that takes it later finds this result.
-- KEYS[1] result key, KEYS[2] request stream, KEYS[3] the request's events stream, KEYS[4] the id's claim
-- ARGV[1] consumer group, ARGV[2] event channel, ARGV[3] terminal event, ARGV[4] result TTL (s),
-- ARGV[5] this worker's claim owner, ARGV[6] '1' to publish even if nothing is acknowledged now (this script sent
-- again after its PUBLISH was refused: answer_entries.lua), ARGV[7] '1' when this script was sent again after its
-- XADD was refused (an error that starts UNAPPENDED), ARGV[8..] the request's stream entry ids
-- Returns 1 (stored, now or by this very script sent before), 0 (another run's event was stored first), -1: the
-- result key holds a value of another type (no worker's), so nothing is stored or acknowledged; the caller dead-letters the entries instead; or -2:
-- another worker holds the id's claim (it runs the id now), so nothing is stored, published or acknowledged.
-- A GET the ACL refuses is raised as the refusal it is (the script is sent again), never read as another type.
-- The terminal event is appended once: by the call that stores it, or by this very script sent again after Redis
-- refused its XADD (ARGV[7]; its own event stored, yet not the stream's last entry). Only then: a flush whose
-- reply was lost is sent again whole, and its token events land after the stored end, which is no reason to
-- append that end a second time.
--!include answer_entries
--!include refusal
local owner = redis.pcall('GET', KEYS[4])
if refused(owner) then
  return redis.error_reply(owner.err)
end
if type(owner) == 'string' and owner ~= ARGV[5] then
  return -2
end
local stored = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[4])
local event = ARGV[3]
if not stored then
  event = redis.pcall('GET', KEYS[1])
  if refused(event) then
    return redis.error_reply(event.err)
  end
  if type(event) == 'table' and event.err then
    return -1
  end
end
-- An events key of another type is no worker's: nothing is appended to it, and it keeps its own expiry.
local append = stored
if not stored and event == ARGV[3] and ARGV[7] == '1' then
  local last = redis.pcall('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if refused(last) then
    return redis.error_reply(last.err)
  end
  append = not last.err and (#last == 0 or last[1][2][2] ~= ARGV[3])
end
if append then
  local added = redis.pcall('XADD', KEYS[3], '*', 'data', ARGV[3])
  if refused(added) then
    return redis.error_reply('UNAPPENDED ' .. added.err)
  end
  if not added.err then
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) * 1000)
  end
end
-- Published once: by the call that stored the event, or by the first call whose XACK acknowledged an entry (one
-- stopped at a refused XACK published nothing; one sent again after it got that far finds nothing to acknowledge).
local acked = answer_entries(KEYS[2], ARGV[1], ARGV, 8, ARGV[2], event, stored or ARGV[6] == '1')
if type(acked) == 'table' then
  return acked  -- a refused PUBLISH's (UNPUBLISHED) or XDEL's error
end
if stored or event == ARGV[3] then
  return 1
end
return 0
