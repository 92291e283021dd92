#!lua
-- Write one dead letter for a stream entry, then acknowledge and delete the entry, all or nothing.
-- An entry no longer pending in the group was already answered or dead-lettered (by this worker, a previous
-- life of it or another worker): no second dead letter is written, the entry is only deleted.
-- KEYS[1] dead-letter stream, KEYS[2] request stream
-- ARGV[1] consumer group, ARGV[2] approximate MAXLEN of the dead-letter stream, ARGV[3] entry id,
-- ARGV[4..] the dead letter's field/value pairs
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[3], ARGV[3], 1)
local written = 0
if #pending == 1 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[3])
  written = 1
end
redis.call('XDEL', KEYS[2], ARGV[3])
return written
