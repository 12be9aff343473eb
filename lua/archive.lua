-- archive.lua — an archived drop leaves Redis: every key of it is removed with UNLINK, which
-- takes a key out at once and frees its value off Redis' main thread (a DEL of a hash of 300,000
-- holds would block Redis while it frees them). A drop has a fixed number of keys (the idempotency
-- keys aside, which expire by themselves), so one call is bounded however big the drop.
-- The caller has marked the drop archived in Postgres first, so readers already serve it from
-- there. Refused while the drop is open, holds anything (held or confirming), or is being rebuilt.
-- KEYS[1] {drop_id}:meta   hash   status, rebuild_token
-- KEYS[2] {drop_id}:stock  hash   h:<bucket> held
-- KEYS[3..] every other key of the drop (engine::keys::DropKeys::every)
-- Returns {"ok", keys removed} | {"err", "open" | "live_holds" | "rebuilding"}
local meta = redis.call('HMGET', KEYS[1], 'status', 'rebuild_token')
if meta[1] and meta[1] ~= 'closed' then return {'err', 'open'} end
if meta[2] then return {'err', 'rebuilding'} end
local stock = redis.call('HGETALL', KEYS[2])
for i = 1, #stock, 2 do
  if string.sub(stock[i], 1, 2) == 'h:' and tonumber(stock[i + 1]) ~= 0 then
    return {'err', 'live_holds'}
  end
end
return {'ok', redis.call('UNLINK', unpack(KEYS))}
