-- Add bonus units to one account's daily quota, for the day that holds `now` only.
--
-- KEYS[1]   the daily quota's hash (d = day start µs, u = used, g = granted).
-- ARGV[1]   now, µs since the epoch; '' to read the Redis server's clock (TIME).
-- ARGV[2]   units to grant (>= 1).
-- ARGV[3..6] the starts of yesterday, today, tomorrow and the day after (µs), as in decide.lua.
-- Returns the units granted for that day in all.
local now = clock(ARGV[1])
local units = tonumber(ARGV[2])
local day, day_end = day_holding(now, 3)
if not day then return redis.error_reply(SKEW) end
local state = redis.call('HMGET', KEYS[1], 'd', 'u', 'g')
local used, granted = 0, units
if tonumber(state[1]) == day then
  used, granted = tonumber(state[2]) or 0, granted + (tonumber(state[3]) or 0)
end
redis.call('HSET', KEYS[1], 'd', string.format('%d', day), 'u', used, 'g', granted)
redis.call('PEXPIRE', KEYS[1], math.ceil((day_end - now) / 1000) + 60000)
return granted
