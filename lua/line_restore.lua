-- line_restore.lua — after Redis lost a queue drop's line (a flush, a failover to an empty
-- replica), sets it up again from the marks Postgres kept, so nobody can jump it: the join counter
-- restarts above its kept high-water mark plus a margin (places handed out after the last mark
-- was kept stay below every new one), the admitted watermark and count come back, and meta's
-- line_rebuilt_ms and line_returning_until_ms are stamped: lua/join.lua gives returning fans
-- their places (receipts) and sessions (admission tokens) issued before line_rebuilt_ms, and
-- lua/admit.lua admits nobody until line_returning_until_ms, so returning fans aren't ordered by
-- how fast they reconnect. A line still there (its counter exists) is left as it is, and so is a
-- line that never had a mark kept (nothing to restore).
-- Time comes from now_ms() (clock.lua, prepended by engine::scripts).
-- KEYS[1] {drop_id}:meta       hash   line_rebuilt_ms, line_returning_until_ms set here
-- KEYS[2] {drop_id}:seq        string the join counter
-- KEYS[3] {drop_id}:watermark  hash   place (highest place admitted), admitted (admissions ever)
-- ARGV[1] the join counter's kept high-water mark
-- ARGV[2] the margin to restart the counter above it
-- ARGV[3] the highest place admitted, as kept
-- ARGV[4] admissions ever, as kept
-- ARGV[5] how long admission waits for returning fans, ms
-- Returns {"restored", now_ms} | {"intact", now_ms} | {"unknown_drop", now_ms}

local now = now_ms()
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown_drop', now} end
local seq_mark, margin = tonumber(ARGV[1]), tonumber(ARGV[2])
local place_mark, admitted_mark = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then return {'intact', now} end
if seq_mark == 0 and place_mark == 0 and admitted_mark == 0 then return {'intact', now} end
redis.call('SET', KEYS[2], string.format('%.0f', seq_mark + margin))
redis.call('HSET', KEYS[3], 'place', string.format('%.0f', place_mark),
  'admitted', string.format('%.0f', admitted_mark))
redis.call('HSET', KEYS[1], 'line_rebuilt_ms', now,
  'line_returning_until_ms', now + tonumber(ARGV[5]))
return {'restored', now}
