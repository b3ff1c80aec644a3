-- release.lua: give back one hold; free the lock and notify waiters when none is left.
--
-- KEYS[1]  PREFIX:{name}:lock
-- KEYS[2]  PREFIX:{name}:waiters
-- KEYS[3]  PREFIX:{name}:queue     (fair waiters: the head is told by name)
-- ARGV[1]  token
-- ARGV[2]  linger in ms
-- ARGV[3]  unlock channel, PREFIX:{name}:unlock
--
-- Returns
--   {1, 0}             the lock is free now; 'released' (or 'w:' .. the fair head) was published
--   {0, holds_left}    still held by the same owner
--   {-1} / {-2} / {-3} not held / held by another owner / expired; nothing changed

local lock_key, token, linger_ms, channel = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now_ms = redis_now()
local owner, holds, _, _, live = read_lock(lock_key, now_ms)

local why = ownership(owner, live, token)
if why ~= 0 then return {why} end

if holds > 1 then
  redis.call('HSET', lock_key, 'holds', holds - 1)
  return {0, holds - 1}
end

free_lock(lock_key, KEYS[2], KEYS[3], now_ms, linger_ms, channel, 'released')
return {1, 0}
