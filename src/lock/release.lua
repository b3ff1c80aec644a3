-- release.lua: give back one hold; when none is left, hand the lock to a waiter of the caller's
-- latchkey process, or free it and notify waiters.
--
-- KEYS[1]  PREFIX:{name}:lock
-- KEYS[2]  PREFIX:{name}:waiters
-- KEYS[3]  PREFIX:{name}:queue     (fair waiters: the head is told by name)
-- ARGV[1]  token
-- ARGV[2]  linger in ms; 0 deletes a freed lock's hash at once (a name that guarded nothing)
-- ARGV[3]  unlock channel, PREFIX:{name}:unlock
-- ARGV[4]  candidate: the token of a waiter in the caller's process to hand the lock to, or ''
-- ARGV[5]  the candidate's lease in ms
-- ARGV[6]  'fair' if the candidate queued fairly, 'plain' otherwise
-- ARGV[7]  how many plain waiters the caller's process has on this lock (candidate included)
-- ARGV[8]  op: a fresh id per Release; a repeat of the same command carries the same one
--
-- The hand-off keeps every promise a free-for-all would: a fair candidate gets the lock only if
-- it is the first live waiter of the queue; a plain one only if no fair waiter queues and every
-- live plain waiter is in the caller's process (so no waiter of another replica is passed
-- over by a hand-off: those are served by the 'released' message instead).
--
-- Returns
--   {1, 0}                           the lock is free now; 'released' (or 'w:' .. the fair
--                                    head) was published
--   {2, fence, lease_ms, queued_at}  handed to the candidate, with this fence and lease
--   {0, holds_left}                  still held by the same owner
--   {3}                              a repeat of this very release (same op), which handed the
--                                    lock to a waiter; nothing changed
--   {-1} / {-2} / {-3}               not held / held by another owner / expired; nothing changed
--
-- The same command run again (its answer lost with a dropped connection) finds its own op and
-- answers what its first run did: {0, holds_left}, or {1, 0} once it freed the lock, also when
-- someone else took the lock since (the grant keeps the freeing release's op, see prelude.lua).
-- A hand-off keeps its op beside `from`: a repeat finds both and answers {3}; the caller's
-- latchkey then asks handed.lua whether the hand-off went to its own candidate (see settle).
-- The op is the caller's request_id when it sent one, so a caller's retry is such a repeat.

local lock_key, waiters_key, queue_key = KEYS[1], KEYS[2], KEYS[3]
local token, linger_ms, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local candidate, candidate_lease_ms, op = ARGV[4], tonumber(ARGV[5]), ARGV[8]
local now_ms, now_us = redis_now()
local owner, holds, fence, _, live, last_op = read_lock(lock_key, now_ms, true)

if last_op == op then
  if owner ~= token then
    if redis.call('HGET', lock_key, 'from') == token then return {3} end
    return {1, 0}
  end
  if live then return {0, holds} end
end

local why = ownership(owner, live, token)
if why ~= 0 then return {why} end

if holds > 2 then
  redis.call('HSET', lock_key, 'holds', holds - 1, 'op', op)
  return {0, holds - 1}
end
if holds == 2 then
  redis.call('HDEL', lock_key, 'holds')
  redis.call('HSET', lock_key, 'op', op)
  return {0, 1}
end

if candidate ~= '' then
  local head = fair_head(queue_key, waiters_key, now_ms)
  local eligible
  if ARGV[6] == 'fair' then
    eligible = head == candidate
  else
    redis.call('ZREMRANGEBYSCORE', waiters_key, '-inf', now_ms)
    eligible = head == nil
      and redis.call('ZSCORE', waiters_key, candidate) ~= false
      and redis.call('ZCARD', waiters_key) <= tonumber(ARGV[7])
  end
  if eligible then
    local queued_at = tonumber(redis.call('ZSCORE', queue_key, candidate)) or 0
    redis.call('ZREM', queue_key, candidate)
    redis.call('ZREM', waiters_key, candidate)
    fence = math.max(fence + 1, now_us)
    redis.call('HSET', lock_key, 'owner', candidate, 'fence', int(fence),
      'until', int(now_ms + candidate_lease_ms), 'from', token, 'op', op)
    redis.call('PEXPIRE', lock_key, candidate_lease_ms + linger_ms)
    return {2, fence, candidate_lease_ms, queued_at}
  end
end

free_lock(lock_key, waiters_key, queue_key, now_ms, linger_ms, channel, 'released', op)
return {1, 0}
