-- Charge `cost` units against every limit of one request, all or nothing.
--
-- KEYS[1..nb]        token buckets (GCRA): the key holds the theoretical arrival time, µs since the epoch.
-- KEYS[nb+1..nb+nq]  daily quotas: a hash, d = start of the day counted (µs), u = units used that day,
--                    g = bonus units granted for that day.
-- KEYS[#KEYS-1..]    (only if ARGV[4] > 0) the request's idempotency record and the key of its kept answer.
--                    The record is a hash: f = the request's fingerprint, s = its state (p: in flight,
--                    a: ended, answer kept, n: ended, answer not kept), o = the claim token while in flight.
-- ARGV[1]            now, µs since the epoch; '' to read the Redis server's clock (TIME), so replicas agree.
-- ARGV[2]            cost, units (0 reads the state and writes nothing).
-- ARGV[3]            nb, the number of buckets.
-- ARGV[4]            how long a claimed key stays in flight at most, ms; 0 if the request has no key.
-- ARGV[5]            shadow limits: '1' at position i if limit i is in shadow mode, else '0'; '' if none is.
--                    A shadow limit is computed and reported but never refuses; when it would refuse it
--                    is not charged (as an enforced limit would not be), so its state stays faithful.
-- ARGV[6]            the request's fingerprint (its method, target and body digest), with a key.
-- ARGV[7]            the token that marks this request's claim on the key, with a key.
-- then per bucket:   interval (µs per unit), burst (units).
-- then per quota:    limit (units; -1 = unlimited: counted, never refused), then the starts of yesterday,
--                    today, tomorrow and the day after (µs) in the quota's time zone, as the caller's clock
--                    sees them; the day that holds `now` is the one counted.
--
-- Returns {denied, now, key_state, then per limit: remaining, reset, retry, day}
--   denied    0 if admitted, else the 1-based index of the first enforced limit that refused
--   key_state 0: no key, or refused by a limit (the key stays free); 1: admitted, the key claimed.
--             A key already in the record is answered before any limit is looked at, charging nothing,
--             as {0, now, key_state} with no limit rows: 2 its request is in flight, 3 it was used
--             for another fingerprint, 4 its answer is kept (then the answer follows: {0, now, 4, answer}),
--             5 its request ended without a kept answer, 6 its kept answer has expired.
--   remaining units left after this request (before it, if refused); -1 for an unlimited quota
--   reset     µs until the bucket is full again / until the day ends
--   retry     µs until this limit would admit `cost`; 0 if it does now; -1 if it never can
--   day       start of the counted day (µs), 0 for buckets
local nb, lease_ms, shadow = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local nq = #KEYS - nb - (lease_ms > 0 and 2 or 0)
local record, answer = nil, nil
if lease_ms > 0 then
  record, answer = KEYS[#KEYS - 1], KEYS[#KEYS]
  local seen = redis.call('HMGET', record, 'f', 's')
  if seen[1] then
    local now = clock(ARGV[1])
    if seen[1] ~= ARGV[6] then return {0, now, 3} end
    if seen[2] == 'p' then return {0, now, 2} end
    if seen[2] == 'n' then return {0, now, 5} end
    local kept = redis.call('GET', answer)
    if not kept then return {0, now, 6} end
    return {0, now, 4, kept}
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
local a = 8
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
  -- Claimed until the request ends (keep.lua or refund.lua); the lease frees it if its replica dies.
  redis.call('HSET', record, 'f', ARGV[6], 's', 'p', 'o', ARGV[7])
  redis.call('PEXPIRE', record, lease_ms)
  out[3] = 1
end
return out
