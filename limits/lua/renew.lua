-- Extend a lease still held (lease.lua) to now + ttl; a lapsed or released one is not taken back.
--
-- KEYS[1]   the account's lease set.
-- ARGV[1]   now, µs since the epoch; '' to read the Redis server's clock (TIME).
-- ARGV[2]   ttl, µs.
-- ARGV[3]   the lease's id.
--
-- Returns 1 if the lease was renewed, 0 if it had lapsed.
local now = clock(ARGV[1])
local ttl = tonumber(ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000))
return 1
