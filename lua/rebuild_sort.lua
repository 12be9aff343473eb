-- rebuild_sort.lua — one slice of a rebuild (see rebuild.lua): a bounded run of the drop's holds,
-- as the caller's HSCAN of the holds hash found them. A hold with an order in Postgres becomes
-- sold; a held hold past its deadline expires; a live one (held or confirming) goes into KEYS[14]
-- by creation time (then id), for rebuild_keep.lua. A `sold` hold without an order (Redis saw a
-- sale Postgres has not: the commit was lost or never made) goes back to `confirming`, due now,
-- so the reconciler asks the gateway, as for any confirm that stopped halfway. A hold seen twice
-- (HSCAN may return one again) ends up the same.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13], and
-- KEYS[14] {drop_id}:rebuild  zset   live hold id → created ms
-- ARGV[1] the rebuild's token
-- ARGV[2..] hold id, its order id in Postgres or "" (none), ...
-- Returns {"ok", holds handled, holds ended} | {"err", "superseded"}
if not rebuild_slice(ARGV[1]) then return {'err', 'superseded'} end
local now = now_ms()
local n, ended = 0, 0
for i = 2, #ARGV, 2 do
  local id, order_id = ARGV[i], ARGV[i + 1]
  local h = load_hold(id)
  n = n + 1
  if not h then
    -- Gone since the scan saw it: nothing to count.
  elseif order_id ~= '' then
    if h.st ~= 'sold' then h.oid = order_id; end_in_rebuild(id, h, 'sold', now) end
  elseif h.st == 'held' and h.exp <= now then
    end_in_rebuild(id, h, 'expired', now); ended = ended + 1
  elseif h.st == 'held' or h.st == 'confirming' then
    redis.call('ZADD', KEYS[14], h.c, id)
  elseif h.st == 'sold' then
    h.st = 'confirming'; h.cexp = now; h.oid = nil
    save_hold(id, h)
    -- Live again: off the purge list its sale put it on.
    redis.call('ZREM', K.done, id)
    redis.call('ZADD', KEYS[14], h.c, id)
  end
end
return {'ok', n, ended}
