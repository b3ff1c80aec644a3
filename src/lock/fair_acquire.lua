-- fair_acquire.lua: grant a fair lock to the head of its queue, or queue the caller.
--
-- KEYS[1]  PREFIX:{name}:lock      the lock hash (see prelude.lua)
-- KEYS[2]  PREFIX:{name}:waiters   waiter id -> Redis ms at which the entry lapses
-- KEYS[3]  PREFIX:{name}:queue     waiter id -> join order (Redis us, strictly increasing)
-- ARGV[1]  token: a fresh UUID, also the waiter id
-- ARGV[2]  lease in ms
-- ARGV[3]  linger in ms
-- ARGV[4]  '1' to join the queue (the caller waits), '0' to try once without queueing
-- ARGV[5]  alive in ms: how long the entry lives unless its latchkey process refreshes it
--
-- Returns
--   {1, fence, 1, lease_ms, queued_at}  granted: the lock was free and the caller first in
--                                   line; queued_at is its join order (0: it never queued,
--                                   or this is the same attempt run again after its grant)
--   {0, holder_ttl_ms, position, order}  not granted (holder_ttl_ms 0: free, but others are
--                                   ahead); position is the 0-based place in the queue, -1 if
--                                   not queued; order its join order (0 if not queued)
--
-- The lock goes to the first live waiter of the queue, in join order. Entries of waiters whose
-- process died lapse after `alive` ms and are skipped (see fair_head in prelude.lua).

local lock_key, waiters_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local token, lease_ms, linger_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local joins, alive_ms = ARGV[4] == '1', tonumber(ARGV[5])

local now_ms, now_us = redis_now()
local owner, _, fence, until_ms, live = read_lock(lock_key, now_ms)
if live and owner == token then
  -- This very attempt took the lock already and runs again, its answer lost with a dropped
  -- connection (see acquire.lua): granted, with the lease left; its join order went with its
  -- queue entry (0). A lock a release handed to this waiter carries `from`: its latchkey
  -- process tells it, and it must not join the queue again.
  if redis.call('HEXISTS', lock_key, 'from') == 0 then
    return {1, fence, 1, until_ms - now_ms, 0}
  end
  return {0, until_ms - now_ms, -1, 0}
end
local head = fair_head(queue_key, waiters_key, now_ms)

if not live and (head == nil or head == token) then
  local queued_at = tonumber(redis.call('ZSCORE', queue_key, token)) or 0
  redis.call('ZREM', queue_key, token)
  redis.call('ZREM', waiters_key, token)
  fence = math.max(fence + 1, now_us)
  grant(lock_key, token, owner, fence, now_ms, lease_ms, linger_ms)
  return {1, fence, 1, lease_ms, queued_at}
end

if joins then
  if not redis.call('ZSCORE', queue_key, token) then
    local tail = redis.call('ZRANGE', queue_key, -1, -1, 'WITHSCORES')
    local order = math.max(now_us, (tonumber(tail[2]) or 0) + 1)
    redis.call('ZADD', queue_key, int(order), token)
  end
  redis.call('ZADD', waiters_key, int(now_ms + alive_ms), token)
  for _, key in ipairs({queue_key, waiters_key}) do
    if redis.call('PTTL', key) < 2 * alive_ms then
      redis.call('PEXPIRE', key, 2 * alive_ms)
    end
  end
end

local ttl = 0
if live then ttl = until_ms - now_ms end
local position = redis.call('ZRANK', queue_key, token)
local order = tonumber(redis.call('ZSCORE', queue_key, token)) or 0
return {0, ttl, position or -1, order}
