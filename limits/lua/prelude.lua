-- Shared helpers, prepended to every script of this folder when the engine loads it.

-- µs since the epoch: the caller's injected time, or '' for the Redis server's clock (TIME), so
-- every gateway replica reads the same clock.
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The day that holds `now` among the four day starts ARGV[a..a+3] (yesterday, today, tomorrow, the
-- day after, as the caller's clock sees them): its start and end, µs; nil if the clocks are over a
-- day apart.
local function day_holding(now, a)
  for j = a, a + 2 do
    local from, to = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
    if from <= now and now < to then return from, to end
  end
end

local SKEW = 'clock skew: the server time is more than a day from the caller\'s'
