-- fair_refresh.lua: keep one latchkey process's queued waiters alive, and say whose turn it is.
--
-- KEYS[1]  PREFIX:{name}:lock
-- KEYS[2]  PREFIX:{name}:waiters
-- KEYS[3]  PREFIX:{name}:queue
-- ARGV[1]  alive in ms
-- ARGV[2..] the waiter ids this process has queued on the lock
--
-- Returns the id of the first live waiter when the lock is free (its wake-up may have been
-- lost, or it just became first because a dead waiter ahead lapsed), else false.
-- Only ids still in the queue are refreshed: a granted or departed waiter is never revived.

local lock_key, waiters_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local alive_ms = tonumber(ARGV[1])
local now_ms = redis_now()

for i = 2, #ARGV do
  if redis.call('ZSCORE', queue_key, ARGV[i]) then
    redis.call('ZADD', waiters_key, int(now_ms + alive_ms), ARGV[i])
  end
end
for _, key in ipairs({queue_key, waiters_key}) do
  if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < 2 * alive_ms then
    redis.call('PEXPIRE', key, 2 * alive_ms)
  end
end

local _, _, _, _, live = read_lock(lock_key, now_ms)
local head = fair_head(queue_key, waiters_key, now_ms)
if head and not live then return head end
return false
