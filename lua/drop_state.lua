-- drop_state.lua — what the restart watcher reads of a drop: its state in meta and, beside it, the
-- run id of the redis-server answering. Read in one script, both come from the node that owns the
-- drop's slot, so on a Redis Cluster each drop is compared with its own shard's run (a failover of
-- one shard sends only that shard's drops through recovery). Changes nothing.
-- KEYS[1] {drop_id}:meta   hash   status, recovering, run_id, rebuild_token, rebuild_slices
-- Returns {status, recovering, run_id, rebuild_token, rebuild_slices, this server's run id}, each
-- field nil when meta lacks it (status nil: the drop isn't in Redis)
local m = redis.call('HMGET', K.meta, 'status', 'recovering', 'run_id', 'rebuild_token',
  'rebuild_slices')
return {m[1], m[2], m[3], m[4], m[5], server_run_id()}
