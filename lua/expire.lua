-- expire.lua — the sweeper: held holds past their deadline go back to stock, a bounded batch per
-- call; ended holds past their keep time are purged the same way. A drop that isn't in Redis (a
-- flush, or one not loaded yet) is left alone: writing here would make a meta hash of one field;
-- so is a drop being rebuilt (lib.lua `recovering`: the rebuild expires what is due itself).
-- While meta's next_due_ms says no hold can be due, nothing is read or written but meta.
-- KEYS: the drop key set described in lib.lua, KEYS[1]..KEYS[13]
-- ARGV[1] most holds to expire (and to purge) in this call
-- Returns {expired count, 1 when more deadlines have passed, or more ended holds and answers are due
--          for purging, than this call's budget (call again), else 0}
local now = now_ms()
local m = redis.call('HMGET', K.meta, 'status', 'next_due_ms', 'recovering')
if not m[1] or m[3] == '1' then return {0, 0} end
local limit = tonumber(ARGV[1])
local expired, next_due = 0, tonumber(m[2])
-- The list's head is looked at whatever next_due_ms says: a release before 2026-12-07 sets that
-- from the deadlines zset alone (docs/OPERATIONS.md, rolling deploys), which would leave the
-- list's holds unreclaimed for good on a drop whose stock is all held (no reserve succeeds there
-- to lower it again).
local head = redis.call('LINDEX', K.expiries, 0)
local head_hold = head and load_hold(head)
if not next_due or now >= next_due or (head and (not head_hold or head_hold.exp <= now)) then
  expired, next_due = reclaim(now, limit, next_due)
end
local purged = purge_ended(now, limit)
if next_due > now and purged < limit then return {expired, 0} end
return {expired, 1}
