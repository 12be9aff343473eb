-- rebuild_finish.lua — the last step of a rebuild or load (see rebuild.lua): once every live hold
-- is taken, the drop leaves `recovering`, stamped with this redis-server run's id.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13], and
-- KEYS[14] {drop_id}:rebuild  zset   live hold id → created ms (must be empty by now)
-- ARGV[1] the rebuild's token
-- Returns {"ok"} | {"err", "superseded"} | {"err", "unsorted"} (live holds still to take)
if not rebuild_slice(ARGV[1]) then return {'err', 'superseded'} end
if redis.call('EXISTS', KEYS[14]) == 1 then return {'err', 'unsorted'} end
redis.call('HDEL', K.meta, 'rebuild_token', 'rebuild_slices')
redis.call('HSET', K.meta, 'recovering', '0', 'run_id', server_run_id())
return {'ok'}
