-- KEYS[1] the record. Replies nil when there is none (Redis removed it at its expiry), or
-- {st, tk, lu, fp, op, sc, rs, pttl, now}: the fields ('' when unset), the milliseconds left
-- before the record expires, and the server's clock. Never writes.
local rec = KEYS[1]
local f = redis.call('HMGET', rec, 'st', 'tk', 'lu', 'fp', 'op', 'sc', 'rs')
if not f[1] then
  return false
end
local pttl = redis.call('PTTL', rec)
return {f[1], f[2] or '', f[3] or '0', f[4] or '', f[5] or '', f[6] or '', f[7] or '',
  ms(pttl), ms(now)}
