-- fair_leave.lua: a queued waiter gives up (timed out, cancelled); if it was first in line for
-- a free lock, the next live waiter is told.
--
-- KEYS[1]  PREFIX:{name}:lock
-- KEYS[2]  PREFIX:{name}:waiters
-- KEYS[3]  PREFIX:{name}:queue
-- ARGV[1]  waiter id
-- ARGV[2]  unlock channel, PREFIX:{name}:unlock
--
-- Returns 1 when the waiter was queued, 0 when it was not (already granted or purged).

local lock_key, waiters_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local waiter, channel = ARGV[1], ARGV[2]
local now_ms = redis_now()

local removed = redis.call('ZREM', queue_key, waiter)
redis.call('ZREM', waiters_key, waiter)
local _, _, _, _, live = read_lock(lock_key, now_ms)
if removed == 1 and not live then
  local head = fair_head(queue_key, waiters_key, now_ms)
  if head then redis.call('PUBLISH', channel, 'w:' .. head) end
end
return removed
