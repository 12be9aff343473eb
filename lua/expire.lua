-- expire.lua — the sweeper: held holds past their deadline go back to stock, a bounded batch per
-- call; ended holds past their keep time are purged the same way.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[11]
-- ARGV[1] most holds to expire (and to purge) in this call
-- Returns {expired count, held holds still past their deadline (more to do when > 0)}
local now = now_ms()
local expired = reclaim(now, tonumber(ARGV[1]), nil)
purge_ended(now, tonumber(ARGV[1]))
return {expired, redis.call('ZCOUNT', K.deadlines, '-inf', now)}
