-- refund.lua — a refund's step 3 (migrations/0007_refunds.sql): the units or seats of a refund
-- Postgres has recorded go back to the drop's stock — per item sold −q and available +q, a seat
-- back to free (and `f` in the seat map) — and the fan's per-fan count goes down by the units.
-- Once per refund: its marker in KEYS[14] says it was returned, here or by a rebuild (which
-- counts every refund Postgres recorded as returned, and writes their markers in the same
-- snapshot: engine::db::RecoverySnapshot), so a rebuild followed by a late call returns nothing
-- twice. A closed drop's books move the same way (its counts agree with Postgres'; nothing sells
-- on a closed drop), and the answer says it was closed. Work: O(items), and a refund has at most
-- its order's items (`drops.max_items_per_hold`). Admission reads the stock on its next run, as
-- after a restock.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13], and
-- KEYS[14] {drop_id}:refunds  hash   "<order id>|<refund id>" → "1" for each refund returned
-- ARGV[1] "<order id>|<refund id>": the refund's marker
-- ARGV[2] the order's hold id (its units must have reached `sold` here first)
-- ARGV[3] the order's fan id
-- ARGV[4] JSON items [{b = bucket, q = units, s = seat?}], as the refunds row has them
-- Returns {"ok", "returned", status} (status: the drop's, "open" or "closed")
--       | {"ok", "already"} (its marker is there: returned before, or counted by a rebuild)
--       | {"err", "hold_not_sold"} (the order's hold is still live here, held or confirming:
--         its confirm finishes first, or it ends, then this is called again)
--       | {"err", "out_of_step"} (the order's hold ended here unsold, expired or released; or a
--         bucket sold fewer units, or a seat isn't sold: Redis doesn't have the sale it refunds;
--         nothing written, a rebuild settles it)
--       | {"err", "recovering"} (the drop is being rebuilt or isn't in Redis: lib.lua)
local marker, hold_id, fan = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', KEYS[14], marker) == 1 then return {'ok', 'already'} end
local status = redis.call('HGET', K.meta, 'status')
if not status or recovering() then return {'err', 'recovering'} end
local h = load_hold(hold_id)
-- A hold purged an hour after it ended was sold long ago (its order exists). One still live here
-- has its units counted as held, not sold: its confirm finishes (or it expires) first. One that
-- ended unsold gave its units back while Postgres committed its order (it expired or was
-- released as the confirm committed, and the confirm's alarm never reached Redis; a copy from
-- before the sale that a restart brought back): waiting can't help, nothing will sell it here.
if h and (h.st == 'held' or h.st == 'confirming') then return {'err', 'hold_not_sold'} end
if h and h.st ~= 'sold' then return {'err', 'out_of_step'} end
local items = cjson.decode(ARGV[4])
local per_bucket, units = {}, 0
for _, it in ipairs(items) do
  per_bucket[it.b] = (per_bucket[it.b] or 0) + it.q
  units = units + it.q
  if it.s and redis.call('HGET', K.seats, it.s) ~= '#' then return {'err', 'out_of_step'} end
end
for b, q in pairs(per_bucket) do
  if (tonumber(redis.call('HGET', K.stock, 's:' .. b)) or 0) < q then
    return {'err', 'out_of_step'}
  end
end
for _, it in ipairs(items) do
  redis.call('HINCRBY', K.stock, 's:' .. it.b, -it.q)
  redis.call('HINCRBY', K.stock, 'a:' .. it.b, it.q)
  if it.s then
    redis.call('HSET', K.seats, it.s, '-')
    show_seat(it.s, 'f')
  end
end
local left = redis.call('HINCRBY', K.fans, fan, -units)
if left <= 0 then redis.call('HDEL', K.fans, fan) end
fan_units_moved(fan, left + units, math.max(left, 0))
redis.call('HSET', KEYS[14], marker, '1')
return {'ok', 'returned', status}
