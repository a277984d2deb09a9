-- Give back what one admitted request took: the exact inverse of decide.lua's charge.
--
-- KEYS               the same keys, in the same order, as the decide call that admitted the request,
--                    its idempotency record (not the answer's key) included if it claimed one.
-- ARGV[1]            now, µs since the epoch; '' to read the Redis server's clock (TIME).
-- ARGV[2]            cost, units, as charged.
-- ARGV[3]            nb, the number of buckets.
-- ARGV[4]            the token of the request's claim on its idempotency record (the last key); '' if none.
-- then per bucket:   interval (µs per unit).
-- then per quota:    the start of the day that was charged (µs); a quota whose day has since turned is
--                    left alone, since yesterday's charge no longer counts.
--
-- A bucket never holds more than its burst and a quota never goes below zero. A request that claimed
-- an idempotency key is refunded only while it still holds the claim, so once: the record goes with
-- the refund and the client may retry with the same key. A request whose answer was kept
-- (keep.lua) no longer holds it, so a replayable answer is never refunded.
-- Returns the number of limits that gave something back.
local nb, claim = tonumber(ARGV[3]), ARGV[4]
local nq = #KEYS - nb - (claim ~= '' and 1 or 0)
if claim ~= '' then
  if redis.call('HGET', KEYS[#KEYS], 'o') ~= claim then return 0 end
  redis.call('DEL', KEYS[#KEYS])
end

local now = clock(ARGV[1])
local cost = tonumber(ARGV[2])
local refunded = 0

for i = 1, nb do
  local interval = tonumber(ARGV[4 + i])
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

for i = nb + 1, nb + nq do
  local state = redis.call('HMGET', KEYS[i], 'd', 'u')
  if state[1] == ARGV[4 + i] then
    redis.call('HSET', KEYS[i], 'u', math.max((tonumber(state[2]) or 0) - cost, 0))
    refunded = refunded + 1
  end
end
return refunded
