-- restock.lua — a seller added stock to a SKU: Redis' total and available rise to Postgres' new
-- total (Postgres was raised first, with its ledger line). "Raise to", not "add": the call is
-- idempotent and order-free — a retried request, or two restocks arriving out of order, leave the
-- bucket at the highest total Postgres committed, never above it. O(1).
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] bucket (a SKU)
-- ARGV[2] the bucket's total in Postgres after the restock
-- Returns {"ok", total, available} (raised, or already at least that: nothing to do)
--       | {"err", "recovering"}: the bucket isn't in Redis (the caller checked the SKU against the
--         drop's definition, so the drop was lost or flushed and its rebuild from Postgres, which
--         has the new total, is due), or lib.lua's recovering (the rebuild in progress may have
--         read the old total); either way the caller retries, with the same request id
local b, target = ARGV[1], tonumber(ARGV[2])
local c = redis.call('HMGET', K.stock, 't:' .. b, 'a:' .. b)
if not c[1] or recovering() then return {'err', 'recovering'} end
local total, available = tonumber(c[1]), tonumber(c[2]) or 0
if target > total then
  available = redis.call('HINCRBY', K.stock, 'a:' .. b, string.format('%d', target - total))
  redis.call('HSET', K.stock, 't:' .. b, string.format('%d', target))
  total = target
end
return {'ok', total, available}
