-- rebuild.lua — recovery, first step: make a drop's Redis state agree with Postgres after Redis
-- lost writes (restart from an AOF that missed its last second, a flush, a failover). Postgres is
-- the truth for what was sold; Redis for which holds are live. The rebuild runs in bounded slices,
-- each a script of its own, so no call holds Redis longer than a slice takes:
--   1. this script: the drop's meta from Postgres, a new rebuild token; the keys derived from the
--      holds (seats and the seat map, per-fan units, live-hold members, deadlines, confirming,
--      admission's running sum and the fans it counts) are dropped (UNLINK: freed off Redis' main
--      thread; the next admission run counts the sum afresh, O(active fans));
--   2. rebuild_fill.lua: stock (total, sold from Postgres, nothing held yet), layout, seats (sold
--      ones from Postgres, the rest free) and per-fan units bought, a slice at a time;
--   3. rebuild_sort.lua: the holds hash, a slice of ids at a time (the caller walks it with HSCAN):
--      holds with an order become sold, held ones past their deadline expire, live ones are put
--      in KEYS[14] by age;
--   4. rebuild_keep.lua: live holds oldest first, a slice at a time: each keeps its units and
--      seats unless that conflicts with a sale (a seat Postgres sold, more units than remain, a
--      fan past the per-fan limit with what Postgres says they bought), else it ends — so the
--      newest lose, as in one atomic rebuild;
--   5. rebuild_finish.lua: the drop leaves `recovering`, stamped with this redis-server's run id.
-- The drop stays `recovering` throughout: no script moves its stock until the last slice (lib.lua
-- `recovering`). A seller may close the drop while Postgres is read: a close already in Redis stands.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13], and
-- KEYS[14] {drop_id}:rebuild  zset   live hold id → created ms, between rebuild_sort and rebuild_keep
-- ARGV[1] the rebuild's token: every later slice names it (a newer rebuild supersedes this one)
--         and counts itself in meta's rebuild_slices (lib.lua `rebuild_slice`)
-- ARGV[2] JSON {field = value}: the drop's meta fields (recovering = "1")
-- Returns {"ok"}
local status = redis.call('HGET', K.meta, 'status')
local was_closed = status == 'closed'
-- A drop whose meta is gone (a flush) comes back keeping its stored answers in its holds hash, as
-- a drop loaded now does (lib.lua); one still in Redis keeps them where they are.
if not status then redis.call('HSET', K.meta, 'answers', 'holds') end
for field, value in pairs(cjson.decode(ARGV[2])) do
  redis.call('HSET', K.meta, field, tostring(value))
end
if was_closed then redis.call('HSET', K.meta, 'status', 'closed') end
-- Deadlines are about to be rewritten: the next reclaim works out the earliest one again.
redis.call('HDEL', K.meta, 'next_due_ms', 'demand_units')
-- Stamped with this run at once: another instance's watcher then sees a rebuild at work (its
-- slice count moving), not a drop left from an earlier Redis run, and leaves it alone.
redis.call('HSET', K.meta, 'recovering', '1', 'rebuild_token', ARGV[1], 'rebuild_slices', 0,
  'run_id', server_run_id())
redis.call('UNLINK', K.seats, K.seatmap, K.fans, K.expiries, K.deadlines, K.confirming,
  K.shopping, KEYS[14])
return {'ok'}
