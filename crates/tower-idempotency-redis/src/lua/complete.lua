-- KEYS[1] the record. ARGV: 1 token, 2 encoded response, 3 retention ms, 4 index prefix (or
-- ''), 5 change channel. Replies the operation id, or nil when the token is not the current
-- holder's (nothing written).
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'st', 'tk', 'op', 'w')
if f[1] ~= 'p' or f[2] ~= ARGV[1] then
  return false
end
redis.call('HSET', rec, 'st', 'c', 'rs', ARGV[2])
redis.call('HDEL', rec, 'tk', 'lu', 'w')
redis.call('PEXPIRE', rec, ARGV[3])
local idx = index_key(ARGV[4], f[3])
if idx then
  redis.call('PEXPIRE', idx, ARGV[3], 'GT')
end
if f[4] then
  redis.call('PUBLISH', ARGV[5], rec)
end
return f[3]
