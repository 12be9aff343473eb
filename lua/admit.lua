-- admit.lua — decides how many fans of a queue drop's line enter now, pops them from the head of
-- the line and makes them active shoppers. Atomic, and safe to call from every queue-server
-- instance at any time: the token bucket, the active set and the stock it reads are all in Redis,
-- so N callers admit no more than one would.
-- How many: the fewest of
--   the token bucket (rate_per_s, burst; time from TIME, elapsed clamped at >= 0),
--   max_active − active shoppers (the active set after dropping entries past their deadline),
--   inventory-aware (docs/ARCHITECTURE.md, Choices): admit one more only while
--     Σ over shopping fans (per_fan_limit − units held or bought, at least 0) + per_fan_limit
--       ≤ available × (1 + admit_margin_pct / 100)
--   where the shopping fans are the active ones before their shop end, and the sum is a running
--   one, meta's demand_units (lua/lib.lua), over the fans in KEYS[13]: this script adds the fans
--   it admits and drops those whose shop end came (at most ARGV[1] per call: any left over
--   still count until the next call, so admission errs on the side of fewer), the hold scripts
--   move it as a counted fan's units change. O(admitted + ended) per call, not O(active).
--   A drop without the sum (new, just rebuilt, or last run by a version without it) gets it
--   counted here once, O(active) (active ≤ max_active),
--   and the line's length. Nobody enters while paused, recovering, closed, sold out, all held,
--   or before opens_at_ms.
-- The waiting list (the drop's `waitlist` setting, docs/ARCHITECTURE.md "The waiting list"):
-- without it, a drop with nothing available or held closes its line for good (line_state
-- sold_out). With it, the line stays as the waiting list (line_state waitlist, for good: the
-- state is `waitlist` from then on) and every later admission is an offer: the same admission,
-- but for offer_window_s instead of shop_window_s, recorded in KEYS[14], and with no margin —
-- admit one more only while demand + per_fan_limit ≤ available — so the units every offered fan
-- (and every other shopping fan) may still take never pass what is available: no unit is
-- offered to two fans at once. An offer unused by its end leaves the running sum (as any shop
-- end does), and the next run offers the unit to the next fan in line. Units that come back
-- (added stock, refunds, holds expiring) are counted for the fans' page: came_back_units rises
-- by each rise of available + held between two runs (a unit back and sold again, or sold and
-- back, between two runs isn't seen: low, never high; runs come every queue.tick_ms).
-- A shopping session has two ends fixed here at admission (docs/ARCHITECTURE.md, invariants): the
-- shop end (now + shop_window_s: reserves are accepted until then) and the hard end (shop end +
-- hold_ttl_ms + confirm_grace_ms: nothing keeps the session, or its max_active slot, past it).
-- Both go into the sessions hash, and queue-server signs them into the fan's admission token, so
-- reserve.lua enforces them without a read and a rebuilt line can restore them.
-- First, waiters unseen for leave_grace_s (no socket on any instance refreshed them, no poll)
-- leave the line, at most ARGV[1] per call, and lose their place: coming back later is a new
-- join at the back. Pre-queue waiters too (a pre-queue place is HMAC(seed, fan), so a fan who
-- comes back before opening gets the very same one). After a gap in admission runs longer than
-- a quarter of the grace (Redis down, every instance stopped, or nobody here for a while), for a
-- whole grace only waiters already gone a grace before the gap began leave: presence refreshes
-- stopped too, so being unseen since says nothing about the fan, and sockets need the time to
-- reconnect. After Redis lost the line, nobody enters until meta's line_returning_until_ms
-- (lua/line_restore.lua): returning fans get their places back meanwhile, so the order they are
-- admitted in is the line's, not their reconnect speed's (the state says recovering).
-- Time comes from now_ms() (clock.lua, prepended by engine::scripts).
-- KEYS[1] {drop_id}:meta       hash   status, recovering, opens_at_ms, per_fan_limit,
--                                     demand_units (see lib.lua)
-- KEYS[2] {drop_id}:admission  hash   rate_per_s, burst, max_active, paused "0"/"1",
--                                     shop_window_s, admit_margin_pct, leave_grace_s,
--                                     waitlist "0"/"1", offer_window_s; set here: line_state
--                                     ("sold_out" | "waitlist", for good), came_back_units and
--                                     free_units_seen (available + held at the last run)
-- KEYS[3] {drop_id}:stock      hash   a:<bucket> available, h:<bucket> held (see lib.lua)
-- KEYS[4] {drop_id}:fans       hash   fan id → units held + confirming + bought
-- KEYS[5] {drop_id}:active     zset   fan id → admission deadline ms
-- KEYS[6] {drop_id}:line       zset   waiting fan id → place
-- KEYS[7] {drop_id}:bucket     hash   tokens, last_ms (the token bucket's state), run_ms (the
--                                     last admission run), quiet_until_ms and quiet_cutoff_ms
--                                     (until then only waiters unseen since the cutoff leave)
-- KEYS[8] {drop_id}:watermark  hash   place (highest place admitted), admitted (admissions ever)
-- KEYS[9] {drop_id}:places     hash   fan id → place (a waiter who leaves loses theirs)
-- KEYS[10] {drop_id}:seen      zset   waiting fan id → last seen ms
-- KEYS[11] {drop_id}:sessions  hash   admitted fan id → "<shop end ms>:<hard end ms>"
-- KEYS[12] {drop_id}:seq       string the join counter (returned, so its high-water mark can be
--                                     kept in Postgres, beyond the reach of a Redis loss)
-- KEYS[13] {drop_id}:shopping  zset   fan id → shop end ms, the fans meta's demand_units counts
-- KEYS[14] {drop_id}:offers    zset   fan id → offer end ms, the fans offered a unit (its window
--                                     ended ones leave it, at most ARGV[1] per call)
-- ARGV[1] most waiters to send away, and most ended sessions to drop, per call
-- ARGV[2] most fans to admit per call (`queue.admit_batch_max`)
-- Returns {state, watermark place (decimal string), admitted ever, waiting, active, rate_per_s,
--          now_ms, left (waiters sent away by this call), leave_grace_ms,
--          shop end ms, hard end ms (of this call's admissions; 0, 0 when it admitted none),
--          the join counter, units come back since the sell-out (waiting list),
--          fan 1, place 1, fan 2, place 2, ...}   (the fans admitted by this call; in state
--                                                  waitlist, each admission is an offer)
--   state: open | paused | pre_queue | all_held | sold_out | waitlist | closed | recovering |
--          unknown_drop

local now = now_ms()

local wm = redis.call('HMGET', KEYS[8], 'place', 'admitted')
local watermark, admitted_ever = wm[1] or '0', tonumber(wm[2]) or 0
local s = redis.call('HMGET', KEYS[2], 'rate_per_s', 'burst', 'max_active', 'paused',
  'shop_window_s', 'admit_margin_pct', 'line_state', 'leave_grace_s', 'waitlist',
  'offer_window_s', 'came_back_units', 'free_units_seen')
local rate = tonumber(s[1]) or 0
local came_back = tonumber(s[11]) or 0
-- 120: DEFAULT_LEAVE_GRACE_S, for drops created before the setting existed.
local grace_ms = (tonumber(s[8]) or 120) * 1000
local left = 0

local shop_end, hard_end = 0, 0

local function answer(state, active, popped)
  local out = {state, watermark, admitted_ever, redis.call('ZCARD', KEYS[6]), active,
    tostring(rate), now, left, grace_ms, shop_end, hard_end, redis.call('GET', KEYS[12]) or '0',
    came_back}
  for _, x in ipairs(popped or {}) do out[#out + 1] = x end
  return out
end

local meta = redis.call('HMGET', KEYS[1], 'status', 'recovering', 'opens_at_ms', 'per_fan_limit',
  'hold_ttl_ms', 'confirm_grace_ms', 'line_returning_until_ms', 'demand_units')
if not meta[1] then return answer('unknown_drop', 0) end

-- Before the recovering check: a Redis restart is such a gap, and recovery may take a while.
local r = redis.call('HMGET', KEYS[7], 'run_ms', 'quiet_until_ms', 'quiet_cutoff_ms')
local last_run, quiet_until, cutoff = tonumber(r[1]), tonumber(r[2]) or 0, tonumber(r[3])
if last_run and now - last_run > grace_ms / 4 then
  quiet_until, cutoff = now + grace_ms, last_run - grace_ms
  redis.call('HSET', KEYS[7], 'quiet_until_ms', quiet_until, 'quiet_cutoff_ms', cutoff)
end
redis.call('HSET', KEYS[7], 'run_ms', now)
if meta[2] == '1' or now < (tonumber(meta[7]) or 0) then return answer('recovering', 0) end

if now >= quiet_until or not cutoff then cutoff = now - grace_ms end
local gone = redis.call('ZRANGEBYSCORE', KEYS[10], '-inf', '(' .. cutoff,
  'LIMIT', 0, tonumber(ARGV[1]))
for _, fan in ipairs(gone) do
  redis.call('ZREM', KEYS[10], fan)
  -- Only a fan still in the line loses their place: an admitted one keeps it (no second place).
  if redis.call('ZREM', KEYS[6], fan) == 1 then
    redis.call('HDEL', KEYS[9], fan)
    left = left + 1
  end
end

-- Sessions past their deadline end, at most ARGV[1] per call (the rest next call); `active`
-- counts only live ones, so the ones left over cost nothing but memory meanwhile.
local ended = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. now, 'LIMIT', 0,
  tonumber(ARGV[1]))
for _, fan in ipairs(ended) do
  redis.call('ZREM', KEYS[5], fan)
  redis.call('HDEL', KEYS[11], fan)
end
local active = redis.call('ZCOUNT', KEYS[5], now, '+inf')
-- Offers past their end leave the offers set, as many (what an offer claims is in the running
-- sum below, which lets it go at the same end).
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[14], '-inf', '(' .. now, 'LIMIT', 0,
  tonumber(ARGV[1]))
for _, fan in ipairs(lapsed) do redis.call('ZREM', KEYS[14], fan) end

-- The running sum of what shopping fans may still take (see the header).
local limit = tonumber(meta[4]) or 1
local function can_take(units)
  units = tonumber(units) or 0
  if units >= limit then return 0 end
  return limit - units
end
local demand = tonumber(meta[8])
local demand_was = demand
-- A sum that can't be right is counted afresh too: below zero, or above zero with no fan left to
-- count (a field deleted by hand while a reserve moved it, a fleet of mixed releases). A sum
-- that drifted low admits more fans than the stock can serve until it is counted again.
if demand and (demand < 0 or (demand > 0 and redis.call('ZCARD', KEYS[13]) == 0)) then
  demand = nil
end
if not demand then
  demand = 0
  redis.call('DEL', KEYS[13])
  local fans = redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf')
  -- In chunks: Lua's unpack fails past a few thousand values, and max_active may be more.
  for from = 1, #fans, 1000 do
    local to = math.min(from + 999, #fans)
    local units = redis.call('HMGET', KEYS[4], unpack(fans, from, to))
    local ends = redis.call('HMGET', KEYS[11], unpack(fans, from, to))
    local counted = {}
    for i = 1, to - from + 1 do
      local shop = ends[i] and string.match(ends[i], '^(%d+):')
      if shop and now < tonumber(shop) then
        counted[#counted + 1] = shop
        counted[#counted + 1] = fans[from + i - 1]
        demand = demand + can_take(units[i])
      end
    end
    if #counted > 0 then redis.call('ZADD', KEYS[13], unpack(counted)) end
  end
else
  local due = redis.call('ZRANGEBYSCORE', KEYS[13], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
  for from = 1, #due, 1000 do
    local to = math.min(from + 999, #due)
    local units = redis.call('HMGET', KEYS[4], unpack(due, from, to))
    for i = 1, to - from + 1 do demand = demand - can_take(units[i]) end
    redis.call('ZREM', KEYS[13], unpack(due, from, to))
  end
end
local function save_demand()
  if demand ~= demand_was then
    redis.call('HSET', KEYS[1], 'demand_units', string.format('%d', demand))
  end
end
save_demand()
demand_was = demand

if meta[1] == 'closed' then return answer('closed', active) end
if s[7] == 'sold_out' then return answer('sold_out', active) end

local available, held = 0, 0
local stock = redis.call('HGETALL', KEYS[3])
for i = 1, #stock, 2 do
  local kind = string.sub(stock[i], 1, 2)
  if kind == 'a:' then available = available + tonumber(stock[i + 1])
  elseif kind == 'h:' then held = held + tonumber(stock[i + 1]) end
end
local waitlisted = s[7] == 'waitlist'
if available == 0 and held == 0 and not waitlisted then
  if s[9] ~= '1' then
    -- No waiting list: the line closes for good.
    redis.call('HSET', KEYS[2], 'line_state', 'sold_out')
    return answer('sold_out', active)
  end
  -- The line becomes the waiting list (see the header), and counts what comes back from here.
  waitlisted, came_back = true, 0
  s[12] = '0'
  redis.call('HSET', KEYS[2], 'line_state', 'waitlist', 'came_back_units', 0,
    'free_units_seen', 0)
end
if waitlisted then
  local free, seen = available + held, tonumber(s[12]) or 0
  if free ~= seen then
    if free > seen then came_back = came_back + free - seen end
    redis.call('HSET', KEYS[2], 'free_units_seen', free, 'came_back_units', came_back)
  end
end

-- The bucket refills while paused too, up to burst, like any token bucket.
local burst = tonumber(s[2]) or 0
local b = redis.call('HMGET', KEYS[7], 'tokens', 'last_ms')
local tokens, last = tonumber(b[1]), tonumber(b[2])
if not tokens or not last then
  tokens, last = burst, now
end
local elapsed = now - last
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate / 1000)
-- TIME can step back on a failover: never move last_ms backwards.
if now > last then last = now end
local function save_bucket()
  redis.call('HSET', KEYS[7], 'tokens', string.format('%.6f', tokens), 'last_ms', last)
end

local state = 'open'
if s[4] == '1' then state = 'paused'
elseif now < (tonumber(meta[3]) or 0) then state = 'pre_queue'
elseif waitlisted then state = 'waitlist'
elseif available == 0 then state = 'all_held' end
if (state ~= 'open' and state ~= 'waitlist') or available == 0 then
  save_bucket()
  return answer(state, active)
end

local n = math.floor(tokens)
n = math.min(n, (tonumber(s[3]) or 0) - active)
n = math.min(n, redis.call('ZCARD', KEYS[6]))
-- At most ARGV[2] a call: what a call pops, answers and publishes stays bounded however many
-- tokens a paused line saved up (the rest enter on the next runs).
n = math.min(n, tonumber(ARGV[2]) or n)
if n > 0 then
  -- An offer claims its units outright: no margin on the waiting list.
  local margin = tonumber(s[6]) or 0
  if waitlisted then margin = 0 end
  -- (demand + k·limit)·100 ≤ available·(100 + margin), integers only.
  local room = available * (100 + margin) - demand * 100
  local by_stock = 0
  if room > 0 then by_stock = math.floor(room / (limit * 100)) end
  n = math.min(n, by_stock)
end
if n <= 0 then
  save_bucket()
  return answer(state, active)
end

local popped = redis.call('ZPOPMIN', KEYS[6], n)
-- 300 s, 60 s, 120 s: DEFAULT_SHOP_WINDOW_S, DEFAULT_CONFIRM_GRACE_MS and DEFAULT_OFFER_WINDOW_S,
-- for drops whose settings predate them.
shop_end = now + (tonumber(s[5]) or 300) * 1000
if waitlisted then shop_end = now + (tonumber(s[10]) or 120) * 1000 end
hard_end = shop_end + (tonumber(meta[5]) or 0) + (tonumber(meta[6]) or 60000)
local session = shop_end .. ':' .. hard_end
local shop_s = string.format('%d', shop_end)
local out = {}
for i = 1, #popped, 2 do
  local fan, place = popped[i], popped[i + 1]
  redis.call('ZADD', KEYS[5], shop_end, fan)
  redis.call('HSET', KEYS[11], fan, session)
  -- The running sum counts the fan from now on (once: one still counted from an earlier session
  -- whose shop end this script hasn't reached yet stays counted once).
  if redis.call('ZADD', KEYS[13], shop_s, fan) == 1 then
    demand = demand + can_take(redis.call('HGET', KEYS[4], fan))
  end
  redis.call('ZREM', KEYS[10], fan)
  if waitlisted then redis.call('ZADD', KEYS[14], shop_s, fan) end
  out[#out + 1] = fan
  out[#out + 1] = place
  if tonumber(place) > tonumber(watermark) then watermark = place end
end
local count = #popped / 2
tokens = tokens - count
admitted_ever = admitted_ever + count
save_bucket()
save_demand()
redis.call('HSET', KEYS[8], 'place', watermark, 'admitted', admitted_ever)
return answer(state, active + count, out)
