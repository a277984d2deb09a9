-- Charge `cost` units against every limit of one request, all or nothing.
--
-- KEYS[1..nb]        token buckets (GCRA): the key holds the theoretical arrival time, µs since the epoch.
-- KEYS[nb+1..nb+nq]  daily quotas: a hash, d = start of the day counted (µs), u = units used that day,
--                    g = bonus units granted for that day.
-- KEYS[nb+nq+1]      (only if ARGV[4] > 0) the idempotency record of this request.
-- ARGV[1]            now, µs since the epoch; '' to read the Redis server's clock (TIME), so replicas agree.
-- ARGV[2]            cost, units (0 reads the state and writes nothing).
-- ARGV[3]            nb, the number of buckets.
-- ARGV[4]            how long to keep the idempotency record, ms; 0 if the request has none.
-- ARGV[5]            shadow limits: '1' at position i if limit i is in shadow mode, else '0'; '' if none is.
--                    A shadow limit is computed and reported but never refuses; when it would refuse it
--                    is not charged (as an enforced limit would not be), so its state stays faithful.
-- then per bucket:   interval (µs per unit), burst (units).
-- then per quota:    limit (units; -1 = unlimited: counted, never refused), then the starts of yesterday,
--                    today, tomorrow and the day after (µs) in the quota's time zone, as the caller's clock
--                    sees them; the day that holds `now` is the one counted.
--
-- Returns {denied, now, replayed, then per limit: remaining, reset, retry, day}
--   denied    0 if admitted, else the 1-based index of the first enforced limit that refused
--   replayed  1 if the idempotency record existed: the first decision is returned and nothing is charged
--   remaining units left after this request (before it, if refused); -1 for an unlimited quota
--   reset     µs until the bucket is full again / until the day ends
--   retry     µs until this limit would admit `cost`; 0 if it does now; -1 if it never can
--   day       start of the counted day (µs), 0 for buckets
local nb, keep_ms, shadow = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local nq = #KEYS - nb - (keep_ms > 0 and 1 or 0)
local record = KEYS[nb + nq + 1]
if record then
  local first = redis.call('GET', record)
  if first then
    local out = {}
    for v in string.gmatch(first, '[^,]+') do out[#out + 1] = tonumber(v) end
    out[3] = 1
    return out
  end
end

local now = clock(ARGV[1])
local cost = tonumber(ARGV[2])

local denied = 0
local out = {0, now, 0}
local function row(i, remaining, reset, retry, day)
  if retry ~= 0 and denied == 0 and string.sub(shadow, i, i) ~= '1' then denied = i end
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
  out[#out + 1] = day
end

local tats = {}
local a = 6
for i = 1, nb do
  local interval, burst = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local tat = math.max(tonumber(redis.call('GET', KEYS[i])) or now, now)
  local new_tat = tat + cost * interval
  local allow_at = new_tat - burst * interval
  if cost > burst then
    row(i, math.floor((now - tat) / interval) + burst, tat - now, -1, 0)
  elseif allow_at > now then
    row(i, math.floor((now - tat) / interval) + burst, tat - now, allow_at - now, 0)
  else
    tats[i] = new_tat
    row(i, math.floor((now - allow_at) / interval), new_tat - now, 0, 0)
  end
end

local days = {}
for i = nb + 1, nb + nq do
  local limit = tonumber(ARGV[a])
  local day, day_end = day_holding(now, a + 1)
  a = a + 5
  if not day then return redis.error_reply(SKEW) end
  local state = redis.call('HMGET', KEYS[i], 'd', 'u', 'g')
  local used, granted = 0, 0
  if tonumber(state[1]) == day then
    used, granted = tonumber(state[2]) or 0, tonumber(state[3]) or 0
  end
  local left = limit + granted - used
  if limit < 0 then
    days[i] = {day, day_end, used + cost, granted}
    row(i, -1, day_end - now, 0, day)
  elseif cost > limit + granted then
    row(i, math.max(left, 0), day_end - now, -1, day)
  elseif cost > left then
    row(i, math.max(left, 0), day_end - now, day_end - now, day)
  else
    days[i] = {day, day_end, used + cost, granted}
    row(i, left - cost, day_end - now, 0, day)
  end
end

out[1] = denied
if denied ~= 0 or cost == 0 then return out end

-- A limit missing from tats/days refused: only a shadow one can have, and it is not charged.
for i = 1, nb do
  if tats[i] then
    redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000))
  end
end
for i = nb + 1, nb + nq do
  if days[i] then
    local day, day_end, used, granted = days[i][1], days[i][2], days[i][3], days[i][4]
    -- Written whole: a hash left from an earlier day must not lend its grants to this one.
    redis.call('HSET', KEYS[i], 'd', string.format('%d', day), 'u', used, 'g', granted)
    -- Relative to `now`, so an injected clock ages keys as the real one would; kept a minute past
    -- the day's end so a caller whose clock runs a little behind still finds it.
    redis.call('PEXPIRE', KEYS[i], math.ceil((day_end - now) / 1000) + 60000)
  end
end
if record then
  local fields = {}
  for k, v in ipairs(out) do fields[k] = string.format('%d', v) end
  redis.call('SET', record, table.concat(fields, ','), 'PX', keep_ms)
end
return out
