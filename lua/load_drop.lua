-- load_drop.lua — a new drop enters Redis: its settings in this call, its inventory (stock,
-- layout, seats) in bounded slices after it (rebuild_fill.lua), then rebuild_finish.lua opens it.
-- A load is a rebuild of a drop that has sold nothing and holds nothing. Until its last slice the
-- drop is `recovering` (reserves answer 503), so a load that stopped halfway is finished by the
-- watcher's rebuild. Does nothing if the drop is already in Redis (creation may be retried).
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] the load's token: every later slice names it (lib.lua `rebuild_slice`)
-- ARGV[2] JSON {field = value}: the drop's meta fields
-- Returns {"ok", "loaded"} | {"ok", "exists"}
if redis.call('EXISTS', K.meta) == 1 then return {'ok', 'exists'} end
for field, value in pairs(cjson.decode(ARGV[2])) do
  redis.call('HSET', K.meta, field, tostring(value))
end
-- answers: this release keeps the drop's stored answers in its holds hash (lib.lua).
redis.call('HSET', K.meta, 'recovering', '1', 'rebuild_token', ARGV[1], 'rebuild_slices', 0,
  'run_id', server_run_id(), 'answers', 'holds')
return {'ok', 'loaded'}
