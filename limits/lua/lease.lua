-- Take one of an account's `limit` concurrent-request places, as a lease that lapses unless renewed.
--
-- KEYS[1]   the account's leases: a sorted set of lease id -> expiry (µs since the epoch).
-- ARGV[1]   now, µs since the epoch; '' to read the Redis server's clock (TIME).
-- ARGV[2]   limit, the places the account may hold at once.
-- ARGV[3]   ttl, µs a lease lasts unless renewed.
-- ARGV[4]   the new lease's id.
--
-- Leases past their expiry are dropped first: the places of a replica that died come back by themselves.
-- Returns {1, held} when taken, or {0, held, µs until the soonest lease lapses} when every place is held.
local now = clock(ARGV[1])
local limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= limit then
  local soonest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, held, tonumber(soonest[2]) - now}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000))
return {1, held + 1}
