-- Give back one lease taken by lease.lua.
--
-- KEYS[1]   the account's lease set.
-- ARGV[1]   the lease's id.
--
-- Returns 1 if the lease was held, 0 if it had lapsed already.
return redis.call('ZREM', KEYS[1], ARGV[1])
