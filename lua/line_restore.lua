-- line_restore.lua — after Redis lost a queue drop's line, or may have lost its tail, sets it up
-- again from the marks Postgres kept, so nobody can jump it: the join counter restarts above
-- both its kept high-water mark and what Redis still has, plus a margin (places handed out after
-- the last mark was kept, or lost with the tail, stay below every new one), the admitted
-- watermark and count come back (the higher of Redis' and the kept marks), and meta's
-- line_rebuilt_ms and line_returning_until_ms are stamped: lua/join.lua gives returning fans
-- their places (receipts) and sessions (admission tokens) issued before line_rebuilt_ms, and
-- lua/admit.lua admits nobody until line_returning_until_ms, so returning fans aren't ordered by
-- how fast they reconnect.
-- Two losses: the whole line (a flush, a failover to an empty replica: the counter is gone), and
-- its tail (a restart from an AOF that missed its last second, a failover to a replica that
-- lagged a moment: the counter is there, but below places it had handed out, and the fans who
-- joined last have no place). The second is told by meta's run_id (the redis-server run the drop
-- was loaded or last rebuilt in; recovery calls this before lua/rebuild.lua stamps the new one)
-- differing from this server's: the drop's data came from another run, so its tail may be
-- missing, and those fans' receipts must bring their places back before newcomers take the
-- counter's next ones. A line whose drop is of this run and whose counter exists is left as it is
-- (a rebuild on a healthy Redis: an order Postgres refused, the rebuild command), and so is a
-- line with no counter and no mark kept (it never moved: nothing to restore).
-- Time comes from now_ms() (clock.lua, prepended by engine::scripts).
-- KEYS[1] {drop_id}:meta       hash   run_id (read); line_rebuilt_ms, line_returning_until_ms
--                                     set here
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
local seq = tonumber(redis.call('GET', KEYS[2]))
local server_run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local same_run = redis.call('HGET', KEYS[1], 'run_id') == server_run
if seq and same_run then return {'intact', now} end
if not seq and seq_mark == 0 and place_mark == 0 and admitted_mark == 0 then
  return {'intact', now}
end
local wm = redis.call('HMGET', KEYS[3], 'place', 'admitted')
redis.call('SET', KEYS[2], string.format('%.0f', math.max(seq or 0, seq_mark) + margin))
redis.call('HSET', KEYS[3],
  'place', string.format('%.0f', math.max(tonumber(wm[1]) or 0, place_mark)),
  'admitted', string.format('%.0f', math.max(tonumber(wm[2]) or 0, admitted_mark)))
redis.call('HSET', KEYS[1], 'line_rebuilt_ms', now,
  'line_returning_until_ms', now + tonumber(ARGV[5]))
return {'restored', now}
