-- rebuild_fill.lua — one slice of a rebuild or load (see rebuild.lua): a bounded run of a drop's
-- stock, layout, seat or per-fan entries from Postgres.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13], and, for "refunds" only,
-- KEYS[14] {drop_id}:refunds  hash   "<order id>|<refund id>" → "1" (lua/refund.lua's markers)
-- ARGV[1] the rebuild's token
-- ARGV[2] what: "stock" | "layout" | "seats" | "fans" | "refunds"
-- ARGV[3..] entries — stock:  bucket, total, sold, ...   (available = total - sold, none held)
--                     layout: section, JSON [[row, seats], ...], ... and
--                             "@<section>-<row>", where its seat 1 is in the seat map, ...
--                     seats:  seat id, "-" (free) | "#" (sold), ... (the seat map with them:
--                             the layout's slices come first)
--                     fans:   fan id, units bought, ...
--                     refunds: "<order id>|<refund id>", ... every refund Postgres recorded
--                             (its units are in the sold counts above no more: marked returned,
--                             so a late lua/refund.lua returns nothing twice)
-- Returns {"ok", entries written} | {"err", "superseded"} (another rebuild began since)
if not rebuild_slice(ARGV[1]) then return {'err', 'superseded'} end
local what, n = ARGV[2], 0
if what == 'stock' then
  for i = 3, #ARGV, 3 do
    local b, total, sold = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    redis.call('HSET', K.stock, 'a:' .. b, total - sold, 'h:' .. b, 0, 's:' .. b, sold,
      't:' .. b, total)
    n = n + 1
  end
elseif what == 'refunds' then
  for i = 3, #ARGV do
    redis.call('HSET', KEYS[14], ARGV[i], '1')
    n = n + 1
  end
else
  local key = ({layout = K.layout, seats = K.seats, fans = K.fans})[what]
  for i = 3, #ARGV, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    if what == 'seats' then show_seat(ARGV[i], ARGV[i + 1] == '#' and 's' or 'f') end
    n = n + 1
  end
end
return {'ok', n}
