-- lib.lua — shared helpers prepended to every hold script by engine::scripts (not loaded alone),
-- after clock.lua (which defines now_ms()).
-- Every hold script receives the same drop key set, named here once:
-- KEYS[1]  {drop_id}:meta        hash   status, recovering, kind, per_fan_limit, hold_ttl_ms, opens_at_ms,
--                                       mode, confirm_timeout_ms, confirm_grace_ms, reclaim_batch, done_ttl_ms,
--                                       run_id (the redis-server run the state was loaded or rebuilt in),
--                                       next_due_ms (no held hold expires before it; see reclaim),
--                                       answers ("holds": stored answers in K.holds; see below)
--                                       rebuild_token, rebuild_slices (a rebuild or load at work)
-- KEYS[2]  {drop_id}:stock       hash   a:<bucket> available, h:<bucket> held (incl. confirming),
--                                       s:<bucket> sold, t:<bucket> total
-- KEYS[3]  {drop_id}:seats       hash   seat id → "-" free | hold id (held or confirming) | "#" sold
-- KEYS[4]  {drop_id}:holds       hash   hold id → JSON hold; "i:<digest>" → a stored answer (below)
-- KEYS[5]  {drop_id}:deadlines   zset   held hold id → expires_at_ms, for holds not in K.expiries:
--                                       put back by a revert or a rebuild, or made by a release before
-- KEYS[6]  {drop_id}:confirming  zset   confirming hold id → confirm deadline ms
-- KEYS[7]  {drop_id}:done        zset   ended hold id → purge_at_ms (kept so a fan can read how it ended);
--                                       "i:<digest>" → purge_at_ms of a refusal's stored answer
-- KEYS[8]  {drop_id}:fans        hash   fan id → units held + confirming + bought (the per-fan limit);
--                                       "h|<fan id>" → the fan's live (held/confirming) hold ids,
--                                       joined by "," (absent: none)
-- KEYS[9]  {drop_id}:expiries    list   hold ids in the order reserve made them (see reclaim)
-- KEYS[10] {drop_id}:layout      hash   section → JSON [[row, seats], ...], front row first;
--                                       "@<section>-<row>" → where the row's seat 1 is in seatmap
-- KEYS[11] {drop_id}:active      zset   fan id → admission deadline ms (queue drops)
-- KEYS[12] {drop_id}:seatmap     string the seat map as fans see it, a byte per seat in the map's
--                                       order (sections, rows front first, seat 1 first): f free,
--                                       h held or confirming, s sold; kept by whoever writes seats
-- KEYS[13] {drop_id}:shopping    zset   fan id → shop end ms, for each active fan meta's demand_units
--                                       counts (queue drops; lua/admit.lua keeps both)
-- KEYS[14] {drop_id}:idem:<digest> string the first answer to an idempotent reserve (reserve only;
--                                       drops whose meta has no `answers`), <digest> 32 hex digits
--
-- A hold is JSON: {fan, st, exp, cexp, ref, oid, u, c, k, it = [{b = bucket, q = qty, s = seat?}]}
-- with st one of held | confirming | sold | released | expired, and k the field of its stored answer.
-- Stored answers (reserve's idempotency): a drop loaded by this release (meta answers = "holds")
-- keeps each reserve's first answer in the holds hash, under "i:" and the request's digest (the
-- last 32 characters of KEYS[14]): "<body sha>\n<hold id>" beside the hold it made, purged with
-- the hold's record (purge_ended); "<body sha>\n<answer JSON>" for a refusal, purged through
-- K.done at hold TTL + 10 minutes. A success then writes no key of its own: its answer goes in the
-- HSET that writes the hold. A drop loaded before keeps them under KEYS[14] with a TTL, as the
-- release that loaded it does, so both releases answer its retries alike during a deploy.
-- meta's demand_units is the running sum admit.lua admits by: over the fans in K.shopping, what
-- each may still take (per_fan_limit − their units, at least 0). Whoever changes such a fan's
-- units moves it (`fan_units_moved`); absent, admit.lua counts it afresh (and fills K.shopping).
-- The rebuild's scripts (rebuild*.lua) take one key more, KEYS[14] {drop_id}:rebuild, named in
-- their own headers.

-- The keys by name. engine::scripts starts every hold script with `name_keys(KEYS)` after this
-- prelude; reserve, a Redis Function (loaded once, its preludes made once per load), names the
-- keys of each call (docs/ARCHITECTURE.md, Choices: reserve is a Redis Function).
local K
local function name_keys(KEYS)
  K = {
    meta = KEYS[1], stock = KEYS[2], seats = KEYS[3], holds = KEYS[4], deadlines = KEYS[5],
    confirming = KEYS[6], done = KEYS[7], fans = KEYS[8], expiries = KEYS[9], layout = KEYS[10],
    active = KEYS[11], seatmap = KEYS[12], shopping = KEYS[13], idem = KEYS[14],
  }
end

-- This redis-server run's id. A drop whose meta carries another one was loaded before a restart:
-- the AOF may have lost its last writes (holds, sales Postgres already has), so it must not sell
-- again until rebuilt. Checked inside the scripts that sell, so no request can slip in between
-- the restart and the engine noticing it.
local function server_run_id()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end

-- A drop being rebuilt or loaded (meta recovering = "1") is frozen: the rebuild counts its stock
-- afresh in slices, so no script may move stock, seats or holds until the last slice ends it.
-- Scripts that would write answer `recovering` instead; answers that change nothing stand.
local function recovering()
  return redis.call('HGET', K.meta, 'recovering') == '1'
end

-- A rebuild or load in progress names itself with a token in meta (rebuild_token); each of its
-- slices carries it, so a slice of a rebuild that another one has since restarted changes nothing.
-- Each slice also counts itself (rebuild_slices): other instances' watchers tell a rebuild that is
-- working from one whose process died by whether the count moves, and leave the first alone.
local function rebuild_slice(token)
  if redis.call('HGET', K.meta, 'rebuild_token') ~= token then return false end
  redis.call('HINCRBY', K.meta, 'rebuild_slices', 1)
  return true
end

local function meta_num(field, default)
  local v = redis.call('HGET', K.meta, field)
  if not v then return default end
  return tonumber(v)
end

local function load_hold(id)
  local raw = redis.call('HGET', K.holds, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save_hold(id, h)
  redis.call('HSET', K.holds, id, cjson.encode(h))
end

-- The first answer of the reserve that made hold `id`, as reserve.lua returned it (JSON), made
-- from the hold's record; nil if the record is gone.
local function hold_answer(id)
  local h = load_hold(id)
  if not h then return nil end
  return cjson.encode({'ok', id, h.exp, h.c, cjson.encode(h.it)})
end

-- A fan's live holds are one field of the fans hash, "h|<fan>" → hold ids joined by ",": reserve
-- reads it with the fan's count and writes it with the new count, so the index costs reserve no
-- call of its own. It held a zset of "<fan>|<hold id>" members before, whose ZADD — a skiplist
-- walked at a random place among every live hold of the drop — was the dearest command of a
-- reserve on a sale-sized drop (docs/BENCHMARKS.md). A field is at most per_fan_limit ids long
-- (every hold has a unit), and `|` and `,` occur in no id (engine/src/ids.rs).
-- Releases before 2026-12-06 ended holds without taking them off the list (they knew only the
-- zset): a list may name ended holds. Readers check each hold's state (`live_only`), and a
-- reserve prunes a list longer than any fan's live holds can be, so it stays bounded.
local function live_holds_field(fan)
  return 'h|' .. fan
end

-- The list `ids` ("a,b,c") without `id`, or nil if nothing is left.
local function without_id(ids, id)
  local rest = {}
  for other in string.gmatch(ids, '[^,]+') do
    if other ~= id then rest[#rest + 1] = other end
  end
  if #rest == 0 then return nil end
  return table.concat(rest, ',')
end

-- The hold ids of the list `ids` whose holds are live (held or confirming), joined by ",", or
-- nil: one HMGET of at most the list's length. A hold record is JSON made by reserve's
-- concatenation or cjson (no spaces); no id can hold a quote (engine/src/ids.rs), so the state
-- is found as text.
local function live_only(ids)
  local list = {}
  for id in string.gmatch(ids, '[^,]+') do list[#list + 1] = id end
  local records = redis.call('HMGET', K.holds, unpack(list))
  local keep = {}
  for i = 1, #list do
    local r = records[i]
    if r and (string.find(r, '"st":"held"', 1, true) or string.find(r, '"st":"confirming"', 1, true)) then
      keep[#keep + 1] = list[i]
    end
  end
  if #keep == 0 then return nil end
  return table.concat(keep, ',')
end

-- A fan's list is longer than it can be with live holds only (each has a unit, and a fan holds at
-- most per_fan_limit units) once it passes this many bytes per unit of the limit: a hold id and
-- its comma are 36 bytes (engine/src/ids.rs). Past it, reserve prunes the list first.
local LIVE_LIST_BYTES_PER_UNIT = 64

local function remember_live_hold(fan, id)
  local field = live_holds_field(fan)
  local ids = redis.call('HGET', K.fans, field)
  redis.call('HSET', K.fans, field, ids and (ids .. ',' .. id) or id)
end

-- Writes the fan's list `ids`, or removes the field when it is nil (no live hold).
local function store_live_holds(field, ids)
  if ids then
    redis.call('HSET', K.fans, field, ids)
  else
    redis.call('HDEL', K.fans, field)
  end
end

local function forget_live_hold(fan, id)
  local field = live_holds_field(fan)
  local ids = redis.call('HGET', K.fans, field)
  if ids then store_live_holds(field, without_id(ids, id)) end
end

-- Whether the fan has a live hold. The list is checked hold by hold and written back pruned if it
-- named ended ones (see above).
local function has_live_hold(fan)
  local field = live_holds_field(fan)
  local ids = redis.call('HGET', K.fans, field)
  if ids then
    local live = live_only(ids)
    if live ~= ids then store_live_holds(field, live) end
    if live then return true end
  end
  return false
end

-- Seat `seat` ("<section>-<row>-<n>") shows as `state` (f, h or s) in the seat map: two O(1)
-- calls, so a page's map is read as one string (GETRANGE) rather than walked field by field over
-- the seats hash. A seat whose row the layout doesn't place is left alone. (The offset goes to
-- Redis formatted as an integer: a Lua number argument takes printf's far costlier float path.)
local function show_seat(seat, state)
  local row, n = string.match(seat, '^(.+)-(%d+)$')
  local first = row and redis.call('HGET', K.layout, '@' .. row)
  if first then
    redis.call('SETRANGE', K.seatmap, string.format('%d', tonumber(first) + tonumber(n) - 1), state)
  end
end

-- What a fan holding or having bought `units` may still take under `limit`.
local function can_take(limit, units)
  if units >= limit then return 0 end
  return limit - units
end

-- A fan's units went from `old` to `new`: if admit.lua's running sum counts the fan (K.shopping),
-- it moves by the change in what the fan may still take. (The sum exists whenever K.shopping has
-- members: both are made together and dropped together.)
local function fan_units_moved(fan, old, new)
  if not redis.call('ZSCORE', K.shopping, fan) then return end
  local m = redis.call('HMGET', K.meta, 'per_fan_limit', 'demand_units')
  if not m[2] then return end
  local limit = tonumber(m[1]) or 1
  local by = can_take(limit, new) - can_take(limit, old)
  if by ~= 0 then redis.call('HINCRBY', K.meta, 'demand_units', string.format('%d', by)) end
end

-- When hold `h`, ending at `now`, leaves the holds hash (K.done): `done_ttl_ms` after it ended,
-- and, if it carries its stored answer ("k"), not before that answer's window has passed: hold TTL
-- + 10 minutes after it was made, as long as a refusal's answer is kept.
local function purge_at(h, now)
  local m = redis.call('HMGET', K.meta, 'done_ttl_ms', 'hold_ttl_ms')
  local at = now + (tonumber(m[1]) or 3600000)
  if h.k then at = math.max(at, h.c + (tonumber(m[2]) or 0) + 600000) end
  return at
end

-- A held or confirming hold gives its units back to stock and ends as `final_state`.
local function return_to_stock(id, h, final_state, now)
  for _, item in ipairs(h.it) do
    redis.call('HINCRBY', K.stock, 'a:' .. item.b, item.q)
    redis.call('HINCRBY', K.stock, 'h:' .. item.b, -item.q)
    if item.s then
      redis.call('HSET', K.seats, item.s, '-')
      show_seat(item.s, 'f')
    end
  end
  local left = redis.call('HINCRBY', K.fans, h.fan, -h.u)
  if left <= 0 then redis.call('HDEL', K.fans, h.fan) end
  fan_units_moved(h.fan, left + h.u, math.max(left, 0))
  redis.call('ZREM', K.deadlines, id)
  redis.call('ZREM', K.confirming, id)
  forget_live_hold(h.fan, id)
  h.st = final_state
  h.ended = now
  save_hold(id, h)
  redis.call('ZADD', K.done, purge_at(h, now), id)
end

-- meta's next_due_ms is a lower bound on every deadline in K.deadlines and K.expiries (missing: unknown), so
-- reserve skips its inline reclaim while nothing can be due: a `redis.call` saved on the hottest
-- path. Whoever adds a deadline below it lowers it (lower_next_due); reclaim sets it afresh; a
-- rebuild deletes it. A bound that is too low only costs one reclaim that finds nothing.
local NO_DEADLINE = 9007199254740992  -- 2^53: no held hold

-- Reserve reclaims a deadline inline only once it has passed by this long, and leaves the fresher
-- ones to the sweeper (expire.lua, every holds.sweep_interval_ms, 250 by default, in batches).
-- Every hold reserve made reaches the head of K.expiries a hold TTL later, ended or not, so in a
-- sale longer than a TTL a deadline passes about as often as a reserve comes: reclaimed inline at
-- once, nearly every reserve would pay for a reclaim. An expired hold that waits can't be
-- confirmed meanwhile (confirm_begin checks its deadline); its units come back when the sweeper
-- or a reserve gets to it, at most this long late while no sweeper runs.
local RESERVE_RECLAIM_LAG_MS = 1000

local function lower_next_due(exp)
  local cur = tonumber(redis.call('HGET', K.meta, 'next_due_ms'))
  if cur and exp < cur then redis.call('HSET', K.meta, 'next_due_ms', exp) end
end

-- Expired held holds go back to stock, at most `limit` of them (every deadline looked at counts,
-- live or not). Returns how many expired and the earliest deadline left (NO_DEADLINE when none; at
-- or before `now` when more are due), which it stores as next_due_ms unless that is already
-- `known_next_due`.
-- Two indexes say when holds expire. K.expiries, a list, has every hold reserve made, in order:
-- an RPUSH where a zset's ZADD cost a reserve a node in a skiplist and a dict among every live
-- hold of the drop (docs/ARCHITECTURE.md, Choices). A drop's holds share its hold TTL, so the
-- list is in deadline order, and its head is the next to expire; holds that ended before (sold,
-- released, confirming) are dropped from it as their deadline passes. K.deadlines, a zset, keeps
-- the few that come back out of order: a reverted confirm, a hold a rebuild kept (and a release
-- before this one's). A TTL shortened mid-sale puts the list out of order: a hold behind one
-- that expires later is reclaimed when that one is (it can't be confirmed past its own
-- deadline meanwhile: confirm_begin checks it).
-- `due_by` (default `now`): only deadlines at or before it count as passed (see
-- RESERVE_RECLAIM_LAG_MS).
local function reclaim(now, limit, known_next_due, due_by)
  due_by = due_by or now
  local expired, seen, next_due = 0, 0, NO_DEADLINE
  -- The first limit + 1 deadlines in order: those due are reclaimed, the next one is next_due.
  local first = redis.call('ZRANGE', K.deadlines, 0, limit, 'WITHSCORES')
  for i = 1, #first, 2 do
    local id, at = first[i], tonumber(first[i + 1])
    if at > due_by or seen == limit then
      next_due = at
      break
    end
    seen = seen + 1
    local h = load_hold(id)
    if h and h.st == 'held' then
      return_to_stock(id, h, 'expired', now)
      expired = expired + 1
    else
      redis.call('ZREM', K.deadlines, id)
    end
  end
  -- Then the list's head, as far as the budget goes: each hold whose deadline has passed leaves
  -- it (reclaimed if still held); the first one that hasn't passed is the list's next due.
  local queued = redis.call('LRANGE', K.expiries, 0, limit - seen)
  local popped = 0
  for i = 1, #queued do
    local h = load_hold(queued[i])
    if h and h.exp > due_by then
      if h.exp < next_due then next_due = h.exp end
      break
    end
    if seen == limit then
      -- Due, and past the budget: the next reclaim starts here.
      next_due = math.min(next_due, h and h.exp or 0)
      break
    end
    seen, popped = seen + 1, popped + 1
    if h and h.st == 'held' then
      return_to_stock(queued[i], h, 'expired', now)
      expired = expired + 1
    end
  end
  if popped > 0 then redis.call('LTRIM', K.expiries, popped, -1) end
  if next_due ~= known_next_due then redis.call('HSET', K.meta, 'next_due_ms', next_due) end
  return expired, next_due
end

-- Ended holds past their keep time leave the holds hash, each with its stored answer (the
-- record's "k"), and so do refusals' stored answers past theirs; at most `limit` of them. The
-- sweeper's job (expire.lua), kept off reserve's hot path. Returns how many it purged.
local function purge_ended(now, limit)
  local gone = redis.call('ZRANGEBYSCORE', K.done, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(gone) do
    local raw = string.sub(id, 1, 2) ~= 'i:' and redis.call('HGET', K.holds, id)
    local answer = raw and string.match(raw, '"k":"(i:%x+)"')
    if answer then redis.call('HDEL', K.holds, id, answer) else redis.call('HDEL', K.holds, id) end
    redis.call('ZREM', K.done, id)
  end
  return #gone
end

-- A rebuild ends a hold without giving anything back: it counts stock, seats and fans afresh.
local function end_in_rebuild(id, h, state, now)
  h.st = state
  h.ended = now
  save_hold(id, h)
  redis.call('ZREM', K.deadlines, id)
  redis.call('ZREM', K.confirming, id)
  redis.call('ZADD', K.done, purge_at(h, now), id)
end
