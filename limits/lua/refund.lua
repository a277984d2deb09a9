-- Give back what one admitted request took: the exact inverse of decide.lua's charge.
--
-- KEYS           the same keys, in the same order, as the decide call that admitted the request.
-- ARGV[1]        now, µs since the epoch; '' to read the Redis server's clock (TIME).
-- ARGV[2]        cost, units, as charged.
-- ARGV[3]        nb, the number of buckets.
-- then per bucket: interval (µs per unit).
-- then per quota:  the start of the day that was charged (µs); a quota whose day has since turned
--                  is left alone, since yesterday's charge no longer counts.
--
-- A bucket never holds more than its burst and a quota never goes below zero. The caller refunds a
-- decision at most once.
-- Returns the number of limits that gave something back.
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local cost = tonumber(ARGV[2])
local nb = tonumber(ARGV[3])
local refunded = 0

for i = 1, nb do
  local interval = tonumber(ARGV[3 + i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat and tat > now then
    tat = tat - cost * interval
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
    else
      redis.call('DEL', KEYS[i])
    end
    refunded = refunded + 1
  end
end

for i = nb + 1, #KEYS do
  local day = ARGV[3 + i]
  local state = redis.call('HMGET', KEYS[i], 'd', 'u')
  if state[1] == day then
    redis.call('HSET', KEYS[i], 'u', math.max((tonumber(state[2]) or 0) - cost, 0))
    refunded = refunded + 1
  end
end
return refunded
