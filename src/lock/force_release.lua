-- force_release.lua: free a lock whoever holds it, and notify waiters.
--
-- KEYS[1]  PREFIX:{name}:lock
-- KEYS[2]  PREFIX:{name}:waiters
-- KEYS[3]  PREFIX:{name}:queue
-- ARGV[1]  linger in ms
-- ARGV[2]  unlock channel, PREFIX:{name}:unlock
-- ARGV[3]  op: a fresh id per ForceRelease (the caller's request_id when it sent one); a repeat
--          of the same command, or the caller's retry with the same request_id, carries the
--          same one
--
-- Returns 1 when the lock was held and is free now, 0 when it was not held. The same command
-- run again (its answer lost with a dropped connection) finds its own op as `forced` and
-- answers 1 again, without touching the lock: someone may hold it again by then.

if redis.call('HGET', KEYS[1], 'forced') == ARGV[3] then return 1 end
local now_ms = redis_now()
local _, _, _, _, live = read_lock(KEYS[1], now_ms, false)
if not live then return 0 end
free_lock(KEYS[1], KEYS[2], KEYS[3], now_ms, tonumber(ARGV[1]), ARGV[2], 'forced', ARGV[3])
return 1
