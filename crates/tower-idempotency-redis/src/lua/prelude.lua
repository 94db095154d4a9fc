-- Shared by every script. The server's clock in milliseconds: leases are decided by Redis's
-- time, never the application's. Redis 7 replicates a script's effects, not the script, so
-- reading TIME before writing is safe.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A millisecond count as an integer string (tostring would switch to exponent notation).
local function ms(x)
  return string.format('%.0f', x)
end
-- The operation-id index key: the index prefix ('' on a Cluster, where the index lives in
-- another slot and the client writes it), then the id in lowercase hex, as uuid's simple form.
local function index_key(prefix, op)
  if prefix == '' then
    return nil
  end
  return prefix .. string.gsub(op, '.', function(c)
    return string.format('%02x', string.byte(c))
  end) .. '}'
end
