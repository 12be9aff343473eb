-- load_drop.lua — a new drop's settings and whole inventory enter Redis in one step.
-- Does nothing if the drop is already loaded (creation may be retried).
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[11]
-- ARGV[1] JSON {meta = {field = value}, buckets = [[bucket, total]], seats = [seat id],
--               layout = {section = [[row, seats]]}}
-- Returns {"ok", "loaded"} | {"ok", "exists"}
if redis.call('EXISTS', K.meta) == 1 then return {'ok', 'exists'} end
local d = cjson.decode(ARGV[1])
for field, value in pairs(d.meta) do redis.call('HSET', K.meta, field, tostring(value)) end
for _, b in ipairs(d.buckets) do
  redis.call('HSET', K.stock, 'a:' .. b[1], b[2], 'h:' .. b[1], 0, 's:' .. b[1], 0, 't:' .. b[1], b[2])
end
for _, seat in ipairs(d.seats) do redis.call('HSET', K.seats, seat, '-') end
for section, rows in pairs(d.layout) do redis.call('HSET', K.layout, section, cjson.encode(rows)) end
redis.call('HSET', K.meta, 'run_id', server_run_id())
return {'ok', 'loaded'}
