-- confirm_finish.lua — the order is committed in Postgres: the hold's units move from held to
-- sold for good. Called after the commit (and after capture), by the request or the reconciler.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] hold id
-- ARGV[2] order id
-- Returns {"ok", "sold"} | {"ok", "already"}
--       | {"err", "unknown_hold"} | {"err", "hold_ended", state}  (its units went back to stock:
--         Postgres sold what Redis had released; the caller must raise the alarm)
--       | {"err", "recovering"} (the drop is being rebuilt, lib.lua: the rebuild or, after it,
--         the reconciler finds the order)
local id, order_id = ARGV[1], ARGV[2]
local h = load_hold(id)
if not h then return {'err', 'unknown_hold'} end
if h.st == 'sold' then return {'ok', 'already'} end
if h.st ~= 'confirming' and h.st ~= 'held' then return {'err', 'hold_ended', h.st} end
if recovering() then return {'err', 'recovering'} end
local now = now_ms()
for _, item in ipairs(h.it) do
  redis.call('HINCRBY', K.stock, 'h:' .. item.b, -item.q)
  redis.call('HINCRBY', K.stock, 's:' .. item.b, item.q)
  if item.s then
    redis.call('HSET', K.seats, item.s, '#')
    show_seat(item.s, 's')
  end
end
redis.call('ZREM', K.deadlines, id)
redis.call('ZREM', K.confirming, id)
forget_live_hold(h.fan, id)
h.st = 'sold'
h.oid = order_id
h.ended = now
save_hold(id, h)
redis.call('ZADD', K.done, purge_at(h, now), id)
-- A queue drop's shopping session ends once the fan has bought all the per-fan limit allows
-- (bought alone: no live hold left), freeing its place among max_active for the next fan.
local limit = meta_num('per_fan_limit', 0)
if limit > 0 and tonumber(redis.call('HGET', K.fans, h.fan) or '0') >= limit
    and not has_live_hold(h.fan) then
  redis.call('ZREM', K.active, h.fan)
  -- Admission's running sum (lib.lua) stops counting the fan: they may take nothing more, so
  -- the sum stays as it is.
  redis.call('ZREM', K.shopping, h.fan)
end
return {'ok', 'sold'}
