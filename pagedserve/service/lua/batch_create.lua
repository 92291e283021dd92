#!lua
-- Create a batch from a submitter's staged lines and output lines, unless a batch with this id exists already.
-- The id is a hash of the file's content (and the submitter's key), so two submits of the same file meet here:
-- the first creates the batch, the second drops its staged copy and gets 0. The record is written last, in the
-- same script as the renames, so a batch is never seen half created.
-- KEYS[1] record, KEYS[2] lines, KEYS[3] out, KEYS[4] staged lines, KEYS[5] staged out, KEYS[6] all batches,
-- KEYS[7] active batches
-- ARGV[1] batch id, ARGV[2] created (ms), ARGV[3] retain until (unix s), ARGV[4] '1' when it has lines to run,
-- ARGV[5..] the record's field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[4], KEYS[5])
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RENAME', KEYS[4], KEYS[2])
  redis.call('EXPIREAT', KEYS[2], ARGV[3])
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[3])
  redis.call('EXPIREAT', KEYS[3], ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIREAT', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
end
return 1
