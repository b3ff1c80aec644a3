-- handed.lua: did the release made with token ARGV[2] hand the lock to ARGV[1]? Asked when that
-- release's answer was lost (timed out, or a command retried after a dropped connection that
-- answered "another owner"). Changes nothing.
--
-- KEYS[1]  PREFIX:{name}:lock
-- ARGV[1]  the candidate's token
-- ARGV[2]  the releasing token
--
-- Returns
--   {1, fence, holds, lease_ms_left}  yes: the candidate owns the lock through that hand-off
--   {0}                               no. The candidate owning the lock is not enough: it may
--                                     have taken the lock by itself (and its own attempt told
--                                     it so), which only `from` (see prelude.lua) tells apart.

local lock_key, candidate, releaser = KEYS[1], ARGV[1], ARGV[2]
local now_ms = redis_now()
local owner, holds, fence, until_ms, live = read_lock(lock_key, now_ms)
if live and owner == candidate and redis.call('HGET', lock_key, 'from') == releaser then
  return {1, fence, holds, until_ms - now_ms}
end
return {0}
