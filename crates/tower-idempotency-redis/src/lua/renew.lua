-- KEYS[1] the record. ARGV: 1 token, 2 lease ms, 3 index prefix (or ''). Moves the lease to
-- `lease` from now and the record's expiry to at least that. Replies the operation id, or nil
-- when the token is not the current holder's (nothing written).
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'st', 'tk', 'op')
if f[1] ~= 'p' or f[2] ~= ARGV[1] then
  return false
end
local lease = tonumber(ARGV[2])
redis.call('HSET', rec, 'lu', ms(now + lease))
if redis.call('PTTL', rec) < lease then
  redis.call('PEXPIRE', rec, ARGV[2])
end
local idx = index_key(ARGV[3], f[3])
if idx then
  redis.call('PEXPIRE', idx, ARGV[2], 'GT')
end
return f[3]
