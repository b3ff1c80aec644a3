-- prelude.lua: shared by every lock script; latchkey prepends it to each script before loading.
--
-- A lock is one hash, KEYS[1] = PREFIX:{name}:lock, with the fields
--   owner  the owner token, 32 hex digits (absent once released)
--   holds  the owner's hold count, only while it is 2 or more: absent means 1 (held) or 0
--          (not held)
--   fence  the fence of the latest grant (kept after release, see below)
--   until  Redis time, in ms, at which the owner's lease ends
--   from   the token of the release that handed the lock to its owner (release.lua); absent
--          when the owner took the lock itself, so handed.lua can tell the two apart
--   op     the id of the latest call that changed the hold count without a new grant: a
--          re-entry, a release that left holds, the release that freed the lock, or the one
--          that handed it to a waiter (kept beside `from`, so a repeat of that release can tell
--          it handed the lock on; release.lua answers it {3}). fred sends
--          a command again when a dropped connection caught it; the repeat carries the same id
--          and is answered as the first run was, instead of counting twice. A caller's
--          `request_id` is the id of its re-entry or release, so its own retries are such
--          repeats too (latchkey picks a random id when it sent none). The freeing
--          release's id stays while the freed hash lingers and through the grant that takes
--          the lock from there (acquire.lua, fair_acquire.lua), so a repeat arriving after
--          someone else took the lock still answers "released"; a grant after a lease that
--          ran out drops it (it may be a re-entry's). A ForceRelease's id goes to `forced`.
--          Only the scripts that count holds read it (read_lock's `with_op`).
--   forced the id of the latest ForceRelease that freed the lock. It too stays through later
--          grants (until the hash goes, or another ForceRelease replaces it): a repeat of that
--          ForceRelease arriving after someone else took the lock finds it and answers "freed"
--          without touching the new holder's lock. Only force_release.lua reads it; a lock
--          that was never force-released does not carry it.
-- Ids are decimal integers below 2^63 and tokens are written without dashes, so Redis keeps a
-- lock held once, with a release's `op` beside it, in a 96-byte listpack: a name taken again
-- costs no more memory than a fresh one (tests/lock.rs checks this; the benchmark's memory row
-- measures it).
-- The hash itself expires `linger` ms after the lease ends. While it lingers, a late Release or
-- Extend by the old owner is answered "expired", and `fence` keeps the next grant above it.
--
-- Time always comes from Redis (TIME), never from a latchkey process, so replicas with skewed
-- clocks agree on when a lease ends.

local function redis_now()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us
end

-- Returns owner (false when none), holds, fence, until_ms, whether the lease is live, and, when
-- asked for `with_op`, the latest op (false when none).
local function read_lock(key, now_ms, with_op)
  local h
  if with_op then
    h = redis.call('HMGET', key, 'owner', 'holds', 'fence', 'until', 'op')
  else
    h = redis.call('HMGET', key, 'owner', 'holds', 'fence', 'until')
  end
  local owner, until_ms = h[1], tonumber(h[4]) or 0
  local live = owner and until_ms > now_ms
  local holds = tonumber(h[2]) or (owner and 1 or 0)
  return owner, holds, tonumber(h[3]) or 0, until_ms, live, h[5]
end

-- Whether `token` may act on the lock: 0 it owns it; -1 not held; -2 held by another owner;
-- -3 it owned it but the lease ended.
local function ownership(owner, live, token)
  if owner == token then
    if live then return 0 end
    return -3
  end
  if live then return -2 end
  return -1
end

-- Numbers above 2^31 must be written with %.0f: Lua's default formatting would round them.
local function int(n)
  return string.format('%.0f', n)
end

-- Fair locks keep a queue, PREFIX:{name}:queue: a sorted set of waiter ids scored by join
-- order. A queued waiter is alive while its entry in PREFIX:{name}:waiters (score: Redis ms at
-- which it lapses) is in the future; its latchkey process refreshes it. Returns the first live
-- waiter of the queue (or nil), removing the lapsed ones ahead of it.
local function fair_head(queue_key, waiters_key, now_ms)
  while true do
    local head = redis.call('ZRANGE', queue_key, 0, 0)[1]
    if not head then return nil end
    local alive_until = tonumber(redis.call('ZSCORE', waiters_key, head))
    if alive_until and alive_until > now_ms then return head end
    redis.call('ZREM', queue_key, head)
    redis.call('ZREM', waiters_key, head)
  end
end

-- Grants the lock to `token`, which took it itself (no `from`), with this fence and lease.
-- The hash is absent, freed (a freeing release's `op` stays, see above), or left by a lease
-- that ran out (`previous_owner`): that owner's holds and op go.
local function grant(key, token, previous_owner, fence, now_ms, lease_ms, linger_ms)
  redis.call('HSET', key, 'owner', token, 'fence', int(fence), 'until', int(now_ms + lease_ms))
  if previous_owner then
    redis.call('HDEL', key, 'holds', 'from', 'op')
  end
  redis.call('PEXPIRE', key, lease_ms + linger_ms)
end

-- Frees a held lock but keeps its fence for `linger` ms, then tells waiters: the head of the
-- fair queue by name ('w:' .. id, so only it wakes), or else anyone ('released' / 'forced').
-- `op`: the id of the freeing call, kept while the hash lingers: a release's as `op`, a
-- ForceRelease's (why == 'forced') as `forced`, which stays through later grants.
local function free_lock(key, waiters_key, queue_key, now_ms, linger_ms, channel, why, op)
  redis.call('HDEL', key, 'owner', 'holds', 'until', 'from', 'op')
  if op and linger_ms > 0 then
    redis.call('HSET', key, why == 'forced' and 'forced' or 'op', op)
  end
  redis.call('PEXPIRE', key, linger_ms)
  local head = fair_head(queue_key, waiters_key, now_ms)
  if head then
    redis.call('PUBLISH', channel, 'w:' .. head)
  else
    redis.call('PUBLISH', channel, why)
  end
end
