-- reserve.lua — a fan takes units of SKUs, named seats, or the best N adjacent seats of a section,
-- all or nothing, as one hold that expires by itself unless confirmed.
-- Checks, in order: idempotency replay, drop recovering / closed / not yet open, admitted (queue
-- drops: the fan is in the active set with a live deadline), per-fan limit, stock or seats. A few
-- holds of the drop expired for a second or more are reclaimed first (when meta's next_due_ms says
-- any can be; lib.lua RESERVE_RECLAIM_LAG_MS), so
-- stock comes back even when no sweeper runs.
-- Unlike confirm_begin it doesn't compare the Redis run id (an INFO per call on the hottest path):
-- a hold taken on stale state after a restart can't sell — confirm_begin refuses until the drop
-- is rebuilt, and the rebuild ends holds that conflict with a sale.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[14] (KEYS[14] = this request's idem key,
--       whose last 32 characters are the request's digest: lib.lua, stored answers)
-- ARGV[1] fan id
-- ARGV[2] new hold id (made by the caller; embeds the drop id)
-- ARGV[3] SHA-256 hex of the request body (idempotency: same key + other body is refused)
-- ARGV[4] request kind: "items" | "seats" | "best"
-- ARGV[5] the session's shop end ms, from the fan's signed admission token (anything but a
--         number when none: a drop without a waiting room, or a token minted before sessions had
--         ends); a queue drop's reserve at or past it is not_admitted
-- ARGV[6] the session's hard end ms, likewise: a hold extends the session no further
-- ARGV[7..] items: bucket, quantity, bucket, quantity, ...   (bucket = sku)
--           seats: section, seat id, section, seat id, ...   (caller checked they exist, no repeats)
--           best:  section, quantity, seats to examine at most (`seats.best_scan_seats_max`)
-- Returns {"ok", hold id, expires_at_ms, now_ms, items JSON [{b, q, s?}]}
--       | {"replay", first answer JSON (an array like the above or {"err", ...}), now_ms}
--       | {"err", code, detail JSON}   code: sold_out | all_held | insufficient_stock |
--           seat_unavailable | limit_exceeded | drop_closed | not_open | idempotency_key_reused |
--           recovering | unknown_drop | not_admitted
-- Every answer but recovering / unknown_drop / idempotency_key_reused / not_admitted is stored, so
-- a retry gets the first answer back (lib.lua, stored answers): a hold's as a field of the holds
-- hash beside its record, for as long as the record is kept; a refusal's for hold TTL + 10 minutes.
-- The engine calls it as a Redis Function (engine/src/scripts/function.rs): the preludes are made
-- once per load, and KEYS and ARGV are the library's, set on each call; the text is the same.
-- Cost (docs/BENCHMARKS.md, reserve script cost): this is the hottest script, and under
-- callgrind most of its instructions went to turning numbers into text (a Lua number passed to
-- redis.call, concatenated or cjson-encoded goes through printf's floating-point path, about
-- 2,500 instructions each) and to the redis.calls themselves. So the success path makes no cjson
-- call and formats each number once, as an integer (`int`); the hold record, the items JSON and
-- the stored answer are the same JSON cjson would make (every reader, old or new, reads them),
-- built by concatenation: the ids and buckets in them are parsed ids that can't hold a character
-- JSON escapes (engine/src/ids.rs).
-- Numbers Redis hands back as strings (meta, counts, the quantity) become numbers by arithmetic
-- (`x + 0`), not `tonumber`: a call into C that parses the string twice (strtod twice), ≈ 9k
-- instructions per reserve in all (docs/BENCHMARKS.md). Only where the value may be absent or
-- not a number (the session ends, optional settings) does `tonumber` stay.

-- redis.call, looked up once (two table lookups saved per call).
local call = redis.call
local fan, hold_id, body_sha, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local shop_end, hard_end = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local function int(x) return string.format('%d', x) end

local meta = call('HMGET', K.meta, 'status', 'recovering', 'per_fan_limit', 'hold_ttl_ms',
  'opens_at_ms', 'reclaim_batch', 'mode', 'next_due_ms', 'confirm_grace_ms', 'answers')
-- Where this drop keeps its stored answers (lib.lua): a field of the holds hash, or a key of its own.
local answer_field = meta[10] == 'holds' and 'i:' .. string.sub(K.idem, -32)
-- A stored answer is "<body sha>\n<answer JSON>", or "<body sha>\n<hold id>" for a hold, whose
-- answer is made from its record: nothing to decode on a refusal's replay.
local first
if answer_field then first = call('HGET', K.holds, answer_field) else first = call('GET', K.idem) end
if first then
  local cut = string.find(first, '\n', 1, true)
  if string.sub(first, 1, cut - 1) ~= body_sha then
    return {'err', 'idempotency_key_reused', '{}'}
  end
  local answer = string.sub(first, cut + 1)
  if string.byte(answer) ~= 91 then answer = hold_answer(answer) end  -- 91: '['
  -- No answer: the hold's record went without it (purged by a release that didn't know of it),
  -- as if the answer had been forgotten with it.
  if answer then return {'replay', answer, now} end
end

if not meta[1] then return {'err', 'unknown_drop', '{}'} end
if meta[2] == '1' then return {'err', 'recovering', '{}'} end
local limit, ttl_ms = meta[3] + 0, meta[4] + 0
local idem_ttl_ms = ttl_ms + 600000

local function refuse(code, detail)
  local ans = {'err', code, cjson.encode(detail or {})}
  local stored = body_sha .. '\n' .. cjson.encode(ans)
  if answer_field then
    call('HSET', K.holds, answer_field, stored)
    call('ZADD', K.done, int(now + idem_ttl_ms), answer_field)
  else
    call('SET', K.idem, stored, 'PX', int(idem_ttl_ms))
  end
  return ans
end

if meta[1] ~= 'open' then return refuse('drop_closed') end
if now < meta[5] + 0 then return refuse('not_open', {opens_at_ms = tonumber(meta[5])}) end
-- A queue drop's token says the fan was admitted; the active set says the session still runs,
-- and the token's shop end says it may still pick. Not stored: the same key may be retried once
-- the fan is admitted again.
if meta[7] == 'queue' then
  local deadline = call('ZSCORE', K.active, fan)
  if not deadline or tonumber(deadline) < now then return {'err', 'not_admitted', '{}'} end
  if shop_end and now >= shop_end then
    return {'err', 'not_admitted', cjson.encode({shop_ended_at_ms = shop_end})}
  end
end

local next_due = meta[8] and meta[8] + 0
local due_by = now - RESERVE_RECLAIM_LAG_MS
if not next_due or due_by >= next_due then
  local _
  _, next_due = reclaim(now, tonumber(meta[6]) or 8, next_due, due_by)
end

-- Why a bucket can't give `want`: the one name each outcome has everywhere.
local function shortage(bucket, want)
  local c = call('HMGET', K.stock, 'a:' .. bucket, 'h:' .. bucket)
  local avail, held = (c[1] or 0) + 0, (c[2] or 0) + 0
  if avail >= want then return nil end
  if avail == 0 and held == 0 then return 'sold_out', {bucket = bucket} end
  if avail == 0 then return 'all_held', {bucket = bucket} end
  return 'insufficient_stock', {bucket = bucket, available = avail}
end

-- The seat ids of the best block of `n` adjacent free seats in `section`, or nil. Reads whole
-- rows front first while fewer than `max_seats` seats have been read (the first row always), so
-- its work is bounded however big the section: a block only further back is not found
-- (insufficient_stock, adjacent = false; the fan can still pick named seats on the map).
local function best_available(section, n, max_seats)
  local rows = cjson.decode(call('HGET', K.layout, section) or '[]')
  local fallback = nil
  local examined = 0
  for _, row in ipairs(rows) do
    if examined >= max_seats then break end
    local label, count = row[1], row[2]
    examined = examined + count
    local ids = {}
    for s = 1, count do ids[s] = section .. '-' .. label .. '-' .. s end
    local states = call('HMGET', K.seats, unpack(ids))
    local s = 1
    while s <= count do
      if states[s] == '-' then
        local e = s
        while e + 1 <= count and states[e + 1] == '-' do e = e + 1 end
        local spare = (e - s + 1) - n
        for off = 0, spare do
          local block = {}
          for j = 1, n do block[j] = ids[s + off + j - 1] end
          if off ~= 1 and spare - off ~= 1 then return block end
          if not fallback then fallback = block end
        end
        s = e + 1
      else
        s = s + 1
      end
    end
  end
  return fallback
end

local items, units = {}, 0
if kind == 'items' then
  for i = 7, #ARGV, 2 do
    local b, q = ARGV[i], ARGV[i + 1] + 0
    items[#items + 1] = {b = b, q = q, qs = ARGV[i + 1]}
    units = units + q
  end
elseif kind == 'seats' then
  for i = 7, #ARGV, 2 do
    items[#items + 1] = {b = ARGV[i], q = 1, s = ARGV[i + 1]}
    units = units + 1
  end
else
  units = ARGV[8] + 0
end

-- The fan's count and live holds (lib.lua), read together and written together below.
local fan_row = call('HMGET', K.fans, fan, live_holds_field(fan))
local bought = (fan_row[1] or 0) + 0
if bought + units > limit then
  return refuse('limit_exceeded', {per_fan_limit = limit, already = bought})
end

if kind == 'items' then
  -- Each SKU's units are taken by the HINCRBY that checks there are enough (one call, not a read
  -- and a write); a shortage gives back what was taken before it says why.
  for i = 1, #items do
    local item = items[i]
    if call('HINCRBY', K.stock, 'a:' .. item.b, '-' .. item.qs) < 0 then
      for j = 1, i do call('HINCRBY', K.stock, 'a:' .. items[j].b, items[j].qs) end
      local code, detail = shortage(item.b, item.q)
      return refuse(code or 'insufficient_stock', detail)
    end
  end
elseif kind == 'seats' then
  local taken = {}
  for _, item in ipairs(items) do
    if call('HGET', K.seats, item.s) ~= '-' then taken[#taken + 1] = item.s end
  end
  if #taken > 0 then
    local code, detail = shortage(items[1].b, 1)
    if code == 'sold_out' or code == 'all_held' then return refuse(code, detail) end
    return refuse('seat_unavailable', {seats = taken})
  end
else
  -- Best available: the front-most row with `units` adjacent free seats; within the section,
  -- prefer a block that leaves no single free seat stranded beside it (an orphan), if one exists.
  local section = ARGV[7]
  local code, detail = shortage(section, units)
  if code then return refuse(code, detail) end
  local seats = best_available(section, units, tonumber(ARGV[9]) or 1)
  if not seats then return refuse('insufficient_stock', {bucket = section, adjacent = false}) end
  items = {}
  for j = 1, units do items[j] = {b = section, q = 1, s = seats[j]} end
end

local exp = now + ttl_ms
-- The stock moves once per bucket (HINCRBY: dearer as an HSET of both counts into the small
-- listpack-encoded stock hash; GA items' available count moved above), and the items JSON
-- ([{"b":…,"q":…,"s":…}]) is made on the way.
local buckets, moved, parts = {}, {}, {}
for i = 1, #items do
  local item = items[i]
  if not moved[item.b] then
    buckets[#buckets + 1] = item.b
    moved[item.b] = 0
  end
  moved[item.b] = moved[item.b] + item.q
  if item.s then
    call('HSET', K.seats, item.s, hold_id)
    show_seat(item.s, 'h')
    parts[i] = '{"b":"' .. item.b .. '","q":1,"s":"' .. item.s .. '"}'
  else
    parts[i] = '{"b":"' .. item.b .. '","q":' .. item.qs .. '}'
  end
end
for i = 1, #buckets do
  local b = buckets[i]
  -- GA items name each SKU once (the caller refuses repeats): the quantity as it came, unformatted.
  local q = (kind == 'items' and #buckets == #items) and items[i].qs or int(moved[b])
  if kind ~= 'items' then call('HINCRBY', K.stock, 'a:' .. b, '-' .. q) end
  call('HINCRBY', K.stock, 'h:' .. b, q)
end
-- Formatting a number costs (see the header): what came as text is used as it came.
local units_s = #items == 1 and items[1].qs or int(units)
local exp_s, now_s = int(exp), int(now)
-- The count and the live-hold list in one write; the count formatted from the number it was read as.
local live = fan_row[2]
if live and #live > limit * LIVE_LIST_BYTES_PER_UNIT then live = live_only(live) end
call('HSET', K.fans, fan, int(bought + units), live_holds_field(fan),
  live and (live .. ',' .. hold_id) or hold_id)
local items_json = '[' .. table.concat(parts, ',') .. ']'
if answer_field then
  -- The record names its stored answer ("k"), which goes when the record goes (lib.lua).
  call('HSET', K.holds, hold_id, '{"fan":"' .. fan .. '","st":"held","exp":' .. exp_s ..
    ',"u":' .. units_s .. ',"c":' .. now_s .. ',"k":"' .. answer_field .. '","it":' .. items_json ..
    '}', answer_field, body_sha .. '\n' .. hold_id)
else
  call('HSET', K.holds, hold_id, '{"fan":"' .. fan .. '","st":"held","exp":' .. exp_s ..
    ',"u":' .. units_s .. ',"c":' .. now_s .. ',"it":' .. items_json .. '}')
end
-- Its deadline is its place in the list (lib.lua `reclaim`).
call('RPUSH', K.expiries, hold_id)
if exp < next_due then call('HSET', K.meta, 'next_due_ms', exp_s) end
-- A hold keeps a queue drop's shopper admitted until it can no longer be confirmed, never past
-- the session's hard end.
if meta[7] == 'queue' then
  local until_ms = exp + (tonumber(meta[9]) or 60000)
  if hard_end and until_ms > hard_end then until_ms = hard_end end
  call('ZADD', K.active, 'XX', 'GT', int(until_ms), fan)
  -- The fan may take `units` fewer now (bought + units <= limit): admission's running sum
  -- (lib.lua) drops by as much, if it counts the fan (then the sum exists: the two are made
  -- together; not read here, as a missing field costs meta's whole listpack scanned on GA drops).
  if call('ZSCORE', K.shopping, fan) then
    call('HINCRBY', K.meta, 'demand_units', '-' .. units_s)
  end
end

-- A drop that keeps its answers in keys: the JSON array cjson would make of the reply, the items
-- a string in it.
if not answer_field then
  call('SET', K.idem, body_sha .. '\n["ok","' .. hold_id .. '",' .. exp_s .. ',' .. now_s ..
    ',"' .. string.gsub(items_json, '"', '\\"') .. '"]', 'PX', int(idem_ttl_ms))
end
return {'ok', hold_id, exp, now, items_json}
