-- release.lua — a fan gives a held hold back; its units or seats return to stock at once.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] hold id
-- ARGV[2] fan id (must own the hold)
-- Returns {"ok", "released"} | {"ok", "already"} (released or expired before: nothing to do)
--       | {"err", "unknown_hold"} (absent, or another fan's) | {"err", "hold_confirming"}
--       | {"err", "hold_sold"} | {"err", "recovering"} (the drop is being rebuilt: lib.lua)
local id, fan = ARGV[1], ARGV[2]
local h = load_hold(id)
if not h or h.fan ~= fan then return {'err', 'unknown_hold'} end
if h.st == 'confirming' then return {'err', 'hold_confirming'} end
if h.st == 'sold' then return {'err', 'hold_sold'} end
if h.st ~= 'held' then return {'ok', 'already'} end
if recovering() then return {'err', 'recovering'} end
return_to_stock(id, h, 'released', now_ms())
return {'ok', 'released'}
