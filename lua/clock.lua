-- clock.lua — the one place a script reads the time. engine::scripts prepends it to every script,
-- so every instance reads one clock: Redis' own TIME, never the caller's machine.
-- The model test (engine/tests/model/) loads the scripts with a prelude of its own in place of
-- this file, so it can move time by hand; production scripts never read time from a key, which
-- would let anyone who can write to Redis move a sale's clock.
-- Defines now_ms(): milliseconds since the epoch, by Redis' clock.

-- (TIME's two strings become numbers by arithmetic: cheaper than tonumber, lua/reserve.lua says why.)
local function now_ms()
  local t = redis.call('TIME')
  local us = t[2] + 0
  return t[1] * 1000 + (us - us % 1000) / 1000
end
