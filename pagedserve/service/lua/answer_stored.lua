#!lua flags=allow-oom
-- allow-oom: it grows nothing (acknowledging and deleting free memory, PUBLISH stores nothing), as the plain XACK,
-- XDEL and PUBLISH it replaces ran under maxmemory too.
-- Answer stream entries of an id that has a result already (a resubmission, a redelivery): acknowledge them,
-- publish the stored terminal event if that acknowledged one, then delete them (answer_entries.lua says why).
-- KEYS[1] request stream
-- ARGV[1] consumer group, ARGV[2] event channel, ARGV[3] the stored terminal event, ARGV[4] '1' to publish even if
-- nothing is acknowledged now (sent again after its PUBLISH was refused), ARGV[5..] stream entry ids
-- Returns how many entries this call acknowledged.
--!include answer_entries
return answer_entries(KEYS[1], ARGV[1], ARGV, 5, ARGV[2], ARGV[3], ARGV[4] == '1')
