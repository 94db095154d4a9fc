-- KEYS[1] the record. ARGV: 1 scope, 2 fingerprint, 3 operation id, 4 token, 5 lease ms,
-- 6 retention ms, 7 index prefix (or ''), 8 change channel.
-- Replies {1, op} (a fresh record), {2, op} (a takeover, keeping the record's operation id)
-- or {0, fingerprint, op, state, response, ms to expiry} (the record that holds the key;
-- nothing written).
-- An expired record is already gone: Redis removed it at its PEXPIRE deadline.
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'st', 'lu', 'fp', 'op', 'rs', 'w')
if f[1] then
  if f[1] == 'p' and tonumber(f[2]) <= now and f[3] == ARGV[2] then
    redis.call('HSET', rec, 'tk', ARGV[4], 'lu', ms(now + tonumber(ARGV[5])))
    redis.call('PEXPIRE', rec, ARGV[6])
    local idx = index_key(ARGV[7], f[4])
    if idx then
      redis.call('PEXPIRE', idx, ARGV[6], 'GT')
    end
    if f[6] then
      redis.call('PUBLISH', ARGV[8], rec)
    end
    return {2, f[4]}
  end
  return {0, f[3], f[4], f[1], f[5] or '', redis.call('PTTL', rec)}
end
-- A hash without a state is not one of ours: start clean rather than merge into it.
redis.call('DEL', rec)
redis.call('HSET', rec, 'st', 'p', 'tk', ARGV[4], 'lu', ms(now + tonumber(ARGV[5])),
  'fp', ARGV[2], 'op', ARGV[3], 'sc', ARGV[1])
redis.call('PEXPIRE', rec, ARGV[6])
local idx = index_key(ARGV[7], ARGV[3])
if idx then
  redis.call('SET', idx, rec, 'PX', ARGV[6])
end
return {1, ARGV[3]}
