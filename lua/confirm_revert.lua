-- confirm_revert.lua — payment failed or was voided: a confirming hold goes back to `held` with
-- its original deadline, or straight back to stock if that deadline has passed.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] hold id
-- ARGV[2] the payment reference the caller is reverting: another attempt that began since (a
--         new reference) is left alone
-- Returns {"ok", "held"} | {"ok", "expired"} | {"ok", "noop", state} (not confirming under that
--         reference: nothing to do)
--       | {"err", "unknown_hold"} | {"err", "recovering"} (the drop is being rebuilt: lib.lua)
local id, ref = ARGV[1], ARGV[2]
local h = load_hold(id)
if not h then return {'err', 'unknown_hold'} end
if h.st ~= 'confirming' or (h.ref or '') ~= ref then return {'ok', 'noop', h.st} end
if recovering() then return {'err', 'recovering'} end
local now = now_ms()
if now >= h.exp then
  return_to_stock(id, h, 'expired', now)
  return {'ok', 'expired'}
end
h.st = 'held'
h.cexp = nil
h.ref = nil
save_hold(id, h)
redis.call('ZREM', K.confirming, id)
redis.call('ZADD', K.deadlines, h.exp, id)
lower_next_due(h.exp)
return {'ok', 'held'}
