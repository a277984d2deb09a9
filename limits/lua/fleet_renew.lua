-- Extend places still held to now + ttl; a lapsed or released place is not taken back.
--
-- ARGV[A]     ttl, µs.
-- ARGV[A+1..] the places.
--
-- Returns how many were renewed.
local ttl, renewed = tonumber(ARGV[A]), 0
for i = A + 1, #ARGV do
  if redis.call('ZSCORE', HELD, ARGV[i]) then
    redis.call('ZADD', HELD, us(now + ttl), ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
