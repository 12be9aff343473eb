-- join.lua — a fan takes a place in a queue drop's line, once: a reconnect, a refresh, a second
-- tab or device gets the same place back, and a fan already admitted (or gone through) keeps their
-- entry in the places hash, so they can't join again. Before `opens_at_ms` the place is the
-- caller's commit–reveal score (HMAC-SHA256(seed, fan) cut to 52 bits, below 2^52); after it,
-- 2^52 + a counter, so the line is first come, first served and never depends on a clock.
-- After Redis lost the line (lua/line_restore.lua stamped meta's line_rebuilt_ms), a fan with no
-- place may bring back what they held from before the loss, verified and passed in by the caller:
-- an admission token (its place and session ends: the session comes back, if its shop end hasn't
-- passed), or a place receipt (the place comes back: in the line, or "done" if it is at or below
-- the admitted watermark, or if the fan bought the per-fan limit). Only proofs issued before the
-- rebuild count, and a receipt only if issued within two leave graces of it: a fan unseen for
-- longer had left the line (one grace), the other covers the time from the loss to its rebuild.
-- After a sell-out with the waiting list on (admit.lua set line_state "waitlist"), the line
-- stays: a waiter is `waitlisted`, and a new arrival takes a place at its back, waitlisted too.
-- Time comes from now_ms() (clock.lua, prepended by engine::scripts).
-- KEYS[1] {drop_id}:meta       hash   status, recovering, opens_at_ms, mode, per_fan_limit,
--                                     line_rebuilt_ms (see lib.lua)
-- KEYS[2] {drop_id}:admission  hash   ops' settings; line_state = "sold_out" once the line closed,
--                                     "waitlist" once it became the waiting list
-- KEYS[3] {drop_id}:places     hash   fan id → place (kept after admission: one place per fan)
-- KEYS[4] {drop_id}:line       zset   waiting fan id → place
-- KEYS[5] {drop_id}:seq        string the counter places after opening come from
-- KEYS[6] {drop_id}:active     zset   admitted fan id → admission deadline ms
-- KEYS[7] {drop_id}:seen       zset   waiting fan id → last seen ms (a join counts as seen;
--                                     admit.lua sends away waiters unseen for leave_grace_s)
-- KEYS[8] {drop_id}:sessions   hash   admitted fan id → "<shop end ms>:<hard end ms>"
-- KEYS[9] {drop_id}:fans       hash   fan id → units held + confirming + bought
-- KEYS[10] {drop_id}:watermark hash   place (highest place admitted), admitted
-- KEYS[11] {drop_id}:shopping  zset   fan id → shop end ms: the fans meta's demand_units counts
--                                     (lua/lib.lua); a returning admitted fan joins them
-- ARGV[1] fan id
-- ARGV[2] pre-queue score, a decimal integer in [0, 2^52) (used only before opening)
-- ARGV[3] a place receipt's place, ARGV[4] its issue time ms ("-", "-" when none)
-- ARGV[5] an admission token's place, ARGV[6] its issue time ms, ARGV[7] its shop end ms,
--         ARGV[8] its hard end ms ("-" x4 when none)
-- Returns {place (decimal string), 1 if the place is new else 0, status, opens_at_ms, now_ms}
--   status: waiting | pre_queue | admitted (in the active set, deadline not passed) |
--           waitlisted (in the line after a sell-out, the waiting list on) |
--           done (admitted before, session over) | sold_out | closed | recovering | unknown_drop |
--           not_queue (the drop has no waiting room)
-- A fan with no place on a sold-out / closed drop gets place "0" and no place is made.

local fan, prequeue_score = ARGV[1], ARGV[2]
local receipt_place, receipt_iat = tonumber(ARGV[3]), tonumber(ARGV[4])
local token_place, token_iat = tonumber(ARGV[5]), tonumber(ARGV[6])
local token_shop_end, token_hard_end = tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_ms()

local meta = redis.call('HMGET', KEYS[1], 'status', 'recovering', 'opens_at_ms', 'mode',
  'per_fan_limit', 'line_rebuilt_ms', 'demand_units')
if not meta[1] then return {'0', 0, 'unknown_drop', 0, now} end
local opens_at = tonumber(meta[3]) or 0
if meta[2] == '1' then return {'0', 0, 'recovering', opens_at, now} end
if meta[4] ~= 'queue' then return {'0', 0, 'not_queue', opens_at, now} end
local line_state = redis.call('HGET', KEYS[2], 'line_state')
-- A place in the line after opening: on the waiting list once the line became one.
local function in_line()
  if line_state == 'waitlist' then return 'waitlisted' end
  return 'waiting'
end

local function status_of(place)
  local deadline = redis.call('ZSCORE', KEYS[6], fan)
  if deadline and tonumber(deadline) >= now then return 'admitted' end
  if redis.call('ZSCORE', KEYS[4], fan) then
    if now < opens_at then return 'pre_queue' end
    return in_line()
  end
  return 'done'
end

local place = redis.call('HGET', KEYS[3], fan)
if place then
  local status = status_of(place)
  if status == 'waiting' or status == 'waitlisted' or status == 'pre_queue' then
    redis.call('ZADD', KEYS[7], now, fan)
    if meta[1] == 'closed' then status = 'closed' end
    if line_state == 'sold_out' then status = 'sold_out' end
  end
  return {place, 0, status, opens_at, now}
end
if meta[1] == 'closed' then return {'0', 0, 'closed', opens_at, now} end
if line_state == 'sold_out' then return {'0', 0, 'sold_out', opens_at, now} end

local rebuilt = tonumber(meta[6])
if rebuilt then
  -- An admitted fan from before the loss: their session, as their admission token has it.
  if token_place and token_iat and token_shop_end and token_hard_end and token_iat < rebuilt
      and now < token_shop_end then
    local key = string.format('%.0f', token_place)
    redis.call('HSET', KEYS[3], fan, key)
    redis.call('ZADD', KEYS[6], 'GT', token_shop_end, fan)
    redis.call('HSET', KEYS[8], fan, string.format('%.0f:%.0f', token_shop_end, token_hard_end))
    -- Admission's running sum counts the fan from now on, if there is one (else admit.lua's
    -- next run counts it afresh, this fan included).
    if meta[7] and redis.call('ZADD', KEYS[11], token_shop_end, fan) == 1 then
      local take = (tonumber(meta[5]) or 1) - (tonumber(redis.call('HGET', KEYS[9], fan)) or 0)
      if take > 0 then redis.call('HINCRBY', KEYS[1], 'demand_units', string.format('%d', take)) end
    end
    return {key, 0, 'admitted', opens_at, now}
  end
  -- A waiter from before the loss: their place, as their receipt has it.
  local grace_ms = (tonumber(redis.call('HGET', KEYS[2], 'leave_grace_s')) or 120) * 1000
  if receipt_place and receipt_iat and receipt_iat < rebuilt
      and receipt_iat >= rebuilt - 2 * grace_ms then
    local key = string.format('%.0f', receipt_place)
    local limit = tonumber(meta[5]) or 0
    local bought = tonumber(redis.call('HGET', KEYS[9], fan)) or 0
    if limit > 0 and bought >= limit then return {'0', 0, 'done', opens_at, now} end
    redis.call('HSET', KEYS[3], fan, key)
    local watermark = tonumber(redis.call('HGET', KEYS[10], 'place')) or 0
    -- At or below the watermark: admitted before the loss, so not again.
    if receipt_place <= watermark then return {key, 0, 'done', opens_at, now} end
    redis.call('ZADD', KEYS[4], key, fan)
    redis.call('ZADD', KEYS[7], now, fan)
    if now < opens_at then return {key, 0, 'pre_queue', opens_at, now} end
    return {key, 0, in_line(), opens_at, now}
  end
end

local status
if now < opens_at then
  place = prequeue_score
  status = 'pre_queue'
else
  -- 2^52 + n stays exact in a double (n < 2^52) and above every pre-queue score.
  place = string.format('%.0f', 4503599627370496 + redis.call('INCR', KEYS[5]))
  status = in_line()
end
redis.call('HSET', KEYS[3], fan, place)
redis.call('ZADD', KEYS[4], place, fan)
redis.call('ZADD', KEYS[7], now, fan)
return {place, 1, status, opens_at, now}
