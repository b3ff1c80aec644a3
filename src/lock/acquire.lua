-- acquire.lua: grant a lock, re-enter it, or register the caller as a waiter.
--
-- KEYS[1]  PREFIX:{name}:lock      the lock hash (see prelude.lua)
-- KEYS[2]  PREFIX:{name}:waiters   sorted set: member = waiter id, score = Redis ms at which the
--                                  entry lapses (the waiter's own deadline)
-- ARGV[1]  token: a fresh UUID for a new grant, or the caller's token to re-enter
-- ARGV[2]  '1' when ARGV[1] must already own the lock (re-entry), '0' otherwise
-- ARGV[3]  lease in ms
-- ARGV[4]  linger in ms
-- ARGV[5]  waiter id, or '' when the caller does not wait
-- ARGV[6]  ms until the waiter's deadline (ignored without a waiter id)
-- ARGV[7]  op: a fresh id per re-entry ('' otherwise); a repeat of the same re-entry (its
--          answer lost with a dropped connection) finds it and is not counted again
--
-- Returns
--   {1, fence, holds, lease_ms}   granted (fresh, or re-entered with the same fence; run again
--                                 after its own grant: the lease left)
--   {0, holder_ttl_ms}            held by someone else; a waiter id is (re)registered
--   {-1} / {-2} / {-3}            re-entry refused: not held / another owner / expired
--
-- Fence: max(stored fence + 1, Redis time in microseconds). The stored part makes fences
-- strictly increase while the hash lives; the time part keeps them increasing after the hash is
-- gone (lingered out, or lost with a Redis restart), as long as Redis' clock does not step back.

local lock_key, waiters_key = KEYS[1], KEYS[2]
local token, reenter, lease_ms, linger_ms = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3]), tonumber(ARGV[4])
local waiter, wait_ms, op = ARGV[5], tonumber(ARGV[6]), ARGV[7]

local now_ms, now_us = redis_now()
local owner, holds, fence, until_ms, live, last_op = read_lock(lock_key, now_ms, reenter)

if reenter then
  local why = ownership(owner, live, token)
  if why ~= 0 then return {why} end
  if last_op == op then return {1, fence, holds, until_ms - now_ms} end
  holds = holds + 1
  redis.call('HSET', lock_key, 'holds', holds, 'until', int(now_ms + lease_ms), 'op', op)
  redis.call('PEXPIRE', lock_key, lease_ms + linger_ms)
  return {1, fence, holds, lease_ms}
end

if live and owner == token then
  -- This very acquire took the lock already: its answer was lost with a dropped connection and
  -- the command runs again (fred retries what a dropped connection caught). Tokens are fresh
  -- per Acquire, and an Acquire stops sending its token once granted. A lock a release handed
  -- to this waiter carries `from` instead: that grant reaches the waiter through its latchkey
  -- process (answering it here too would let it leave before the hand-off arrives), and the
  -- waiter never registers for a lock it already owns.
  if redis.call('HEXISTS', lock_key, 'from') == 0 then
    return {1, fence, holds, until_ms - now_ms}
  end
  return {0, until_ms - now_ms}
end

if live then
  if waiter ~= '' then
    redis.call('ZREMRANGEBYSCORE', waiters_key, '-inf', now_ms)
    redis.call('ZADD', waiters_key, int(now_ms + wait_ms), waiter)
    if redis.call('PTTL', waiters_key) < wait_ms then
      redis.call('PEXPIRE', waiters_key, wait_ms)
    end
  end
  return {0, until_ms - now_ms}
end

fence = math.max(fence + 1, now_us)
grant(lock_key, token, owner, fence, now_ms, lease_ms, linger_ms)
if waiter ~= '' then
  redis.call('ZREM', waiters_key, waiter)
end
return {1, fence, 1, lease_ms}
