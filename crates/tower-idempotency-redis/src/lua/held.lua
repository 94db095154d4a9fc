-- KEYS[1] the record. ARGV: 1 '1' to mark the record watched (its completion or release then
-- publishes), '0' to only look. Replies the token of a live lease, or nil (completed, released,
-- expired, or a lease that lapsed and awaits takeover).
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'st', 'tk', 'lu')
if f[1] ~= 'p' or tonumber(f[3]) <= now then
  return false
end
if ARGV[1] == '1' then
  redis.call('HSET', rec, 'w', '1')
end
return f[2]
