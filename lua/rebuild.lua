-- rebuild.lua — recovery: make a drop's Redis state agree with Postgres after Redis lost writes
-- (restart from an AOF that missed its last second, a flush, a failover). Postgres is the truth
-- for what was sold; Redis for which holds are live. In one atomic step:
--   holds with an order in Postgres become sold; held holds past their deadline expire;
--   seats: sold ones from Postgres, held ones from live holds, the rest free;
--   held = units of live holds, sold = Postgres, available = total - sold - held;
--   per-fan units = bought (Postgres) + live holds. Live holds that conflict with a sale (a seat
--   Postgres sold, more units held than remain, or a fan past the per-fan limit with what
--   Postgres says they bought) end, newest first.
-- Then the drop leaves `recovering`, stamped with this redis-server run's id.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[11]
-- ARGV[1] JSON {meta = {field = value}, buckets = [[bucket, total, sold]], seats = [seat id],
--               sold_seats = [seat id], layout = {section = [[row, seats]]},
--               bought = {fan = units}, orders = {hold id = order id}}
-- Returns {"ok", live holds kept, holds ended}
local d = cjson.decode(ARGV[1])
local now = now_ms()
-- A seller may close the drop while Postgres is read: a close already in Redis stands.
local was_closed = redis.call('HGET', K.meta, 'status') == 'closed'
for field, value in pairs(d.meta) do redis.call('HSET', K.meta, field, tostring(value)) end
if was_closed then redis.call('HSET', K.meta, 'status', 'closed') end
-- Deadlines are about to be rewritten: the next reclaim works out the earliest one again.
redis.call('HDEL', K.meta, 'next_due_ms')
for section, rows in pairs(d.layout) do redis.call('HSET', K.layout, section, cjson.encode(rows)) end

redis.call('DEL', K.seats, K.fans, K.fanholds)
for _, seat in ipairs(d.seats) do redis.call('HSET', K.seats, seat, '-') end
for _, seat in ipairs(d.sold_seats) do redis.call('HSET', K.seats, seat, '#') end

local function finish_ended(id, h, state)
  h.st = state
  h.ended = now
  save_hold(id, h)
  redis.call('ZREM', K.deadlines, id)
  redis.call('ZREM', K.confirming, id)
  redis.call('ZADD', K.done, now + meta_num('done_ttl_ms', 3600000), id)
end

-- Sort the drop's holds: sold in Postgres, ended, or live (oldest first, so the newest lose).
local live = {}
local ended = 0
local all = redis.call('HGETALL', K.holds)
for i = 1, #all, 2 do
  local id, h = all[i], cjson.decode(all[i + 1])
  local order_id = d.orders[id]
  if order_id then
    if h.st ~= 'sold' then h.oid = order_id; finish_ended(id, h, 'sold') end
  elseif h.st == 'held' and h.exp <= now then
    finish_ended(id, h, 'expired'); ended = ended + 1
  elseif h.st == 'held' or h.st == 'confirming' then
    live[#live + 1] = {id = id, h = h}
  elseif h.st == 'sold' then
    -- Redis saw a sale Postgres has not: the commit was lost or never made. Let the reconciler
    -- ask the gateway, as for any confirm that stopped halfway.
    h.st = 'confirming'; h.cexp = now; h.oid = nil
    save_hold(id, h)
    -- Live again: off the purge list its sale put it on.
    redis.call('ZREM', K.done, id)
    live[#live + 1] = {id = id, h = h}
  end
end
-- Ties (holds made in the same millisecond) break by id, so which hold loses is decided, not left
-- to table.sort (which isn't stable).
table.sort(live, function(x, y)
  if x.h.c ~= y.h.c then return x.h.c < y.h.c end
  return x.id < y.id
end)

local room, held = {}, {}
for _, b in ipairs(d.buckets) do
  room[b[1]] = b[2] - b[3]
  held[b[1]] = 0
end
local kept = 0
-- Units per fan: bought (Postgres) plus the live holds kept so far, against the per-fan limit.
local limit = tonumber(d.meta.per_fan_limit)
local fan_units = {}
for fan, units in pairs(d.bought) do fan_units[fan] = units end
for _, entry in ipairs(live) do
  local id, h = entry.id, entry.h
  local fits = (fan_units[h.fan] or 0) + h.u <= limit
  local need = {}
  for _, item in ipairs(h.it) do
    need[item.b] = (need[item.b] or 0) + item.q
    if item.s and redis.call('HGET', K.seats, item.s) ~= '-' then fits = false end
  end
  for b, q in pairs(need) do
    if (room[b] or 0) < q then fits = false end
  end
  if fits then
    for b, q in pairs(need) do room[b] = room[b] - q; held[b] = held[b] + q end
    for _, item in ipairs(h.it) do
      if item.s then redis.call('HSET', K.seats, item.s, id) end
    end
    fan_units[h.fan] = (fan_units[h.fan] or 0) + h.u
    remember_live_hold(h.fan, id)
    if h.st == 'held' then
      redis.call('ZADD', K.deadlines, h.exp, id)
    else
      redis.call('ZADD', K.confirming, h.cexp or now, id)
    end
    kept = kept + 1
  else
    finish_ended(id, h, 'expired'); ended = ended + 1
  end
end

for fan, units in pairs(fan_units) do redis.call('HSET', K.fans, fan, units) end
for _, b in ipairs(d.buckets) do
  local bucket, total, sold = b[1], b[2], b[3]
  redis.call('HSET', K.stock, 'a:' .. bucket, room[bucket], 'h:' .. bucket, held[bucket],
    's:' .. bucket, sold, 't:' .. bucket, total)
end
redis.call('HSET', K.meta, 'recovering', '0', 'run_id', server_run_id())
return {'ok', kept, ended}
