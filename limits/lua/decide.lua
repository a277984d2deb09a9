-- Charge `cost` units against every limit of one request, all or nothing.
--
-- KEYS[1..nb]    token buckets (GCRA): the key holds the theoretical arrival time, µs since the epoch.
-- KEYS[nb+1..]   daily quotas: a hash, d = start of the day counted (µs), u = units used that day.
-- ARGV[1]        now, µs since the epoch; '' to read the Redis server's clock (TIME), so replicas agree.
-- ARGV[2]        cost, units (0 reads the state and writes nothing).
-- ARGV[3]        nb, the number of buckets.
-- then per bucket: interval (µs per unit), burst (units).
-- then per quota:  limit (units; -1 = unlimited: counted, never refused), then the starts of yesterday,
--                  today, tomorrow and the day after (µs) in the quota's time zone, as the caller's clock
--                  sees them; the day that holds `now` is the one counted.
--
-- Returns {denied, now, then per limit: remaining, reset, retry, day}
--   denied    0 if admitted, else the 1-based index of the first limit that refused
--   remaining units left after this request (before it, if refused); -1 for an unlimited quota
--   reset     µs until the bucket is full again / until the day ends
--   retry     µs until this limit would admit `cost`; 0 if it does now; -1 if it never can
--   day       start of the counted day (µs), 0 for buckets
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local cost = tonumber(ARGV[2])
local nb = tonumber(ARGV[3])

local denied = 0
local out = {0, now}
local writes = {}
local a = 4

for i = 1, nb do
  local interval, burst = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local allow_at = new_tat - burst * interval
  if cost > burst then
    if denied == 0 then denied = i end
    out[#out + 1] = math.floor((now - tat) / interval + burst)
    out[#out + 1] = tat - now
    out[#out + 1] = -1
  elseif allow_at > now then
    if denied == 0 then denied = i end
    out[#out + 1] = math.floor((now - tat) / interval + burst)
    out[#out + 1] = tat - now
    out[#out + 1] = allow_at - now
  else
    writes[i] = new_tat
    out[#out + 1] = math.floor((now - allow_at) / interval)
    out[#out + 1] = new_tat - now
    out[#out + 1] = 0
  end
  out[#out + 1] = 0
end

for i = nb + 1, #KEYS do
  local limit = tonumber(ARGV[a])
  local day, day_end
  for j = a + 1, a + 3 do
    local from, to = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
    if from <= now and now < to then day, day_end = from, to end
  end
  a = a + 5
  if not day then
    return redis.error_reply('clock skew: the server time is more than a day from the caller\'s')
  end
  local state = redis.call('HMGET', KEYS[i], 'd', 'u')
  local used = 0
  if tonumber(state[1]) == day then used = tonumber(state[2]) or 0 end
  if limit < 0 then
    writes[i] = used + cost
    out[#out + 1] = -1
    out[#out + 1] = day_end - now
    out[#out + 1] = 0
  elseif cost > limit then
    if denied == 0 then denied = i end
    out[#out + 1] = math.max(limit - used, 0)
    out[#out + 1] = day_end - now
    out[#out + 1] = -1
  elseif used + cost > limit then
    if denied == 0 then denied = i end
    out[#out + 1] = math.max(limit - used, 0)
    out[#out + 1] = day_end - now
    out[#out + 1] = day_end - now
  else
    writes[i] = used + cost
    out[#out + 1] = limit - used - cost
    out[#out + 1] = day_end - now
    out[#out + 1] = 0
  end
  out[#out + 1] = day
  writes[-i] = {day, day_end}
end

out[1] = denied
if denied ~= 0 or cost == 0 then return out end

for i = 1, nb do
  local ttl_ms = math.ceil((writes[i] - now) / 1000)
  redis.call('SET', KEYS[i], string.format('%d', writes[i]), 'PX', ttl_ms)
end
for i = nb + 1, #KEYS do
  local day, day_end = writes[-i][1], writes[-i][2]
  redis.call('HSET', KEYS[i], 'd', string.format('%d', day), 'u', writes[i])
  -- Relative to `now`, so an injected clock ages keys as the real one would; kept a minute past
  -- the day's end so a caller whose clock runs a little behind still finds it.
  redis.call('PEXPIRE', KEYS[i], math.ceil((day_end - now) / 1000) + 60000)
end
return out
