-- inspect.lua: the state of a lock, without its owner token. Writes nothing.
--
-- KEYS[1]  PREFIX:{name}:lock
-- KEYS[2]  PREFIX:{name}:waiters
--
-- Returns {held (0/1), fence, ttl_ms, holds, waiters}
--   fence is the latest grant's fence (also after release, while the hash lingers);
--   ttl_ms and holds are 0 when the lock is not held; waiters counts unlapsed waiter entries.

local now_ms = redis_now()
local _, holds, fence, until_ms, live = read_lock(KEYS[1], now_ms)
local waiters = redis.call('ZCOUNT', KEYS[2], '(' .. int(now_ms), '+inf')
if live then
  return {1, fence, until_ms - now_ms, holds, waiters}
end
return {0, fence, 0, 0, waiters}
