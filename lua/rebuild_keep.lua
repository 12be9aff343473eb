-- rebuild_keep.lua — one slice of a rebuild (see rebuild.lua): the oldest live holds rebuild_sort
-- put in KEYS[14], at most ARGV[2] of them. Each keeps its units and seats — counted as held, its
-- seats marked, its units added to the fan's, its deadline or confirm deadline back — unless that
-- conflicts with a sale or an older hold: a seat not free, fewer units available than it holds,
-- or the fan past the per-fan limit. Then it ends as `expired`. Oldest first, so the newest lose.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13], and
-- KEYS[14] {drop_id}:rebuild  zset   live hold id → created ms
-- ARGV[1] the rebuild's token
-- ARGV[2] most holds to take in this call
-- Returns {"ok", holds handled, holds kept, holds ended, live holds left to take}
--       | {"err", "superseded"}
if not rebuild_slice(ARGV[1]) then return {'err', 'superseded'} end
local now = now_ms()
local limit = meta_num('per_fan_limit', 0)
local taken = redis.call('ZPOPMIN', KEYS[14], tonumber(ARGV[2]))
local n, kept, ended = 0, 0, 0
for i = 1, #taken, 2 do
  local id = taken[i]
  local h = load_hold(id)
  n = n + 1
  if h then
    local fits = tonumber(redis.call('HGET', K.fans, h.fan) or '0') + h.u <= limit
    local need = {}
    for _, item in ipairs(h.it) do
      need[item.b] = (need[item.b] or 0) + item.q
      if item.s and redis.call('HGET', K.seats, item.s) ~= '-' then fits = false end
    end
    for b, q in pairs(need) do
      if tonumber(redis.call('HGET', K.stock, 'a:' .. b) or '0') < q then fits = false end
    end
    if fits then
      for b, q in pairs(need) do
        redis.call('HINCRBY', K.stock, 'a:' .. b, -q)
        redis.call('HINCRBY', K.stock, 'h:' .. b, q)
      end
      for _, item in ipairs(h.it) do
        if item.s then
          redis.call('HSET', K.seats, item.s, id)
          show_seat(item.s, 'h')
        end
      end
      redis.call('HINCRBY', K.fans, h.fan, h.u)
      remember_live_hold(h.fan, id)
      if h.st == 'held' then
        redis.call('ZADD', K.deadlines, h.exp, id)
      else
        redis.call('ZADD', K.confirming, h.cexp or now, id)
      end
      kept = kept + 1
    else
      end_in_rebuild(id, h, 'expired', now); ended = ended + 1
    end
  end
end
return {'ok', n, kept, ended, redis.call('ZCARD', KEYS[14])}
