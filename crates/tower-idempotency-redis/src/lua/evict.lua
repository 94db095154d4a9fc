-- KEYS[1] the record. ARGV: 1 index prefix (or ''), 2 change channel. Deletes the record in any
-- state, and its operation-index entry; tells waiters as a release does. Replies 1 if there
-- was a record, 0 if not.
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'op', 'w')
if redis.call('DEL', rec) == 0 then
  return 0
end
local idx = f[1] and index_key(ARGV[1], f[1])
if idx then
  redis.call('DEL', idx)
end
if f[2] then
  redis.call('PUBLISH', ARGV[2], rec)
end
return 1
