-- KEYS[1] the record. ARGV: 1 token, 2 index prefix (or ''), 3 change channel. Replies the
-- operation id, or nil when the token is not the current holder's (nothing written).
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'st', 'tk', 'op', 'w')
if f[1] ~= 'p' or f[2] ~= ARGV[1] then
  return false
end
redis.call('DEL', rec)
local idx = index_key(ARGV[2], f[3])
if idx then
  redis.call('DEL', idx)
end
if f[4] then
  redis.call('PUBLISH', ARGV[3], rec)
end
return f[3]
