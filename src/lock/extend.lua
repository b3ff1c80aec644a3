-- extend.lua: set the remaining lease of a held lock, counted from now.
--
-- KEYS[1]  PREFIX:{name}:lock
-- ARGV[1]  token
-- ARGV[2]  lease in ms
-- ARGV[3]  linger in ms
--
-- Returns
--   {1, lease_ms}       extended
--   {-1} / {-2} / {-3}  not held / held by another owner / expired; nothing changed

local lock_key, token, lease_ms, linger_ms = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now_ms = redis_now()
local owner, _, _, _, live = read_lock(lock_key, now_ms)

local why = ownership(owner, live, token)
if why ~= 0 then return {why} end

redis.call('HSET', lock_key, 'until', int(now_ms + lease_ms))
redis.call('PEXPIRE', lock_key, lease_ms + linger_ms)
return {1, lease_ms}
