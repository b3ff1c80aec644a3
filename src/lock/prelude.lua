-- prelude.lua: shared by every lock script; latchkey prepends it to each script before loading.
--
-- A lock is one hash, KEYS[1] = PREFIX:{name}:lock, with the fields
--   owner  the owner token (absent once released)
--   holds  re-entry count of the owner
--   fence  the fence of the latest grant (kept after release, see below)
--   until  Redis time, in ms, at which the owner's lease ends
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

-- Returns owner (false when none), holds, fence, until_ms, and whether the lease is live.
local function read_lock(key, now_ms)
  local h = redis.call('HMGET', key, 'owner', 'holds', 'fence', 'until')
  local owner, until_ms = h[1], tonumber(h[4]) or 0
  local live = owner and until_ms > now_ms
  return owner, tonumber(h[2]) or 0, tonumber(h[3]) or 0, until_ms, live
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

-- Frees a held lock but keeps its fence for `linger` ms, then tells waiters.
local function free_lock(key, linger_ms, channel, why)
  redis.call('HDEL', key, 'owner', 'holds', 'until')
  redis.call('PEXPIRE', key, linger_ms)
  redis.call('PUBLISH', channel, why)
end
