-- confirm_begin.lua — payment starts: a held hold of this fan, not past its deadline, becomes
-- `confirming` until a confirm deadline; only then may the gateway be charged.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] hold id
-- ARGV[2] fan id (must own the hold)
-- ARGV[3] payment reference
-- Returns {"ok", hold JSON}                  began: the caller authorizes, commits, captures
--       | {"in_progress", hold JSON}         confirming already under this same reference
--       | {"sold", order id}                 confirmed before: the caller answers with that order
--       | {"err", code}  code: unknown_hold | confirm_in_progress (another reference) |
--                        hold_expired | hold_released | recovering
local id, fan, ref = ARGV[1], ARGV[2], ARGV[3]
local h = load_hold(id)
if not h or h.fan ~= fan then return {'err', 'unknown_hold'} end
if h.st == 'sold' then return {'sold', h.oid or ''} end
if h.st == 'confirming' then
  if h.ref == ref then return {'in_progress', cjson.encode(h)} end
  return {'err', 'confirm_in_progress'}
end
if h.st == 'released' then return {'err', 'hold_released'} end
if h.st == 'expired' then return {'err', 'hold_expired'} end
-- Checked before anything is written: a drop being rebuilt is frozen (lib.lua `recovering`).
local meta = redis.call('HMGET', K.meta, 'recovering', 'run_id')
if meta[1] == '1' then return {'err', 'recovering'} end
if meta[2] ~= server_run_id() then
  -- Redis restarted since the drop was loaded: no payment until it is rebuilt from Postgres.
  redis.call('HSET', K.meta, 'recovering', '1')
  return {'err', 'recovering'}
end
local now = now_ms()
if now >= h.exp then
  return_to_stock(id, h, 'expired', now)
  return {'err', 'hold_expired'}
end
h.st = 'confirming'
h.ref = ref
h.cexp = now + meta_num('confirm_timeout_ms', 60000)
save_hold(id, h)
redis.call('ZREM', K.deadlines, id)
redis.call('ZADD', K.confirming, h.cexp, id)
return {'ok', cjson.encode(h)}
