-- Shared by the fleet scripts (fleet_*.lua), prepended after prelude.lua: one pool's places and its line.
--
-- KEYS[1]  held: a sorted set of places taken, member "images:low:id:plan\nbackend" -> expiry (µs). A place is
--          a lease: the replica that holds it renews it, and a dead replica's places lapse by themselves.
-- KEYS[2]  backends: a hash, backend -> "images rate expiry": what each backend advertised it can hold
--          (images), how fast it drains (images per second), and when that reading lapses (µs).
-- KEYS[3]  tickets: a hash, ticket -> JSON {k = 'sync' | 'job', n = images, p = plan, a = account}.
-- KEYS[4]  waiting: a hash, "plan\naccount" -> the account's ticket in that plan's line (one per person);
--          "plan\naccount\njobs" -> how many of its async jobs wait there.
-- KEYS[5]  lapse: a sorted set, sync ticket -> the instant it lapses if its holder has not come back (µs).
-- KEYS[6]  meta: a hash; held = images held in all, held:<plan> = images that plan holds,
--          held_low = images the lowest-priority plans hold, at:<backend> = images placed on that backend,
--          due:<plan> = the latest turn told in that line, in:<plan> and in_at:<plan> = the images that plan
--          was let in with, decayed over TAKEN_US (a moving rate), and when that was last updated.
-- KEYS[7]  orphans: a set of async jobs whose place lapsed while they ran (their replica died).
-- KEYS[7+2i-1], KEYS[7+2i]  plan i's line (ticket -> its turn, µs; FIFO, since turns never go back) and the
--          async jobs among it (job -> its turn).
-- ARGV[1]  now, µs since the epoch; '' to read the Redis server's clock (TIME).
-- ARGV[2]  the number of plans; then per plan, highest priority first: name, priority, 1 if lowest priority.
-- Every key carries the pool's hash tag, so a fleet script runs unchanged on a Redis Cluster.
local HELD, BACKENDS, TICKETS, WAITING, LAPSE, META = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ORPHANS = KEYS[7]
local now = clock(ARGV[1])
local plans, by_name = {}, {}
for i = 1, tonumber(ARGV[2]) do
  local a = 3 + (i - 1) * 3
  local plan = {name = ARGV[a], priority = tonumber(ARGV[a + 1]), low = ARGV[a + 2] == '1',
                line = KEYS[6 + 2 * i], jobs = KEYS[7 + 2 * i]}
  plans[i] = plan
  by_name[plan.name] = plan
end
local A = 3 + 3 * #plans  -- the script's own arguments start here

-- A µs instant as Redis should store it: Lua would write a number this large with 14 digits, in e-notation.
local function us(t)
  return string.format('%.0f', t)
end

local function held_images(field)
  return tonumber(redis.call('HGET', META, field) or '0')
end

local function count_place(member, sign)
  local images, low, _, plan, backend = string.match(member, '^(%d+):(%d):([^:]+):([^\n]*)\n(.*)$')
  images = tonumber(images) * sign
  redis.call('HINCRBY', META, 'held', images)
  redis.call('HINCRBY', META, 'held:' .. plan, images)
  redis.call('HINCRBY', META, 'at:' .. backend, images)
  if low == '1' then redis.call('HINCRBY', META, 'held_low', images) end
end

local function release_place(member)
  if redis.call('ZREM', HELD, member) == 0 then return 0 end
  count_place(member, -1)
  return 1
end

-- µs over which the images each plan is let in with are averaged into a rate.
local TAKEN_US = 10000000

-- The images `plan` was let in with recently, decayed to now (about its rate × TAKEN_US).
local function taken(plan)
  local count = tonumber(redis.call('HGET', META, 'in:' .. plan.name) or '0')
  local at = tonumber(redis.call('HGET', META, 'in_at:' .. plan.name) or '0')
  return count * math.exp(-(now - at) / TAKEN_US)
end

local function take_place(plan, images, id, ttl, backend)
  redis.call('HSET', META, 'in:' .. plan.name, tostring(taken(plan) + images), 'in_at:' .. plan.name, us(now))
  local member = images .. ':' .. (plan.low and '1' or '0') .. ':' .. id .. ':' .. plan.name .. '\n' .. backend
  redis.call('ZADD', HELD, us(now + ttl), member)
  count_place(member, 1)
  return member
end

-- Take a ticket out of its line; its holder's claim on it goes too. Returns its record, or nil if it was gone.
local function drop_ticket(ticket)
  redis.call('ZREM', LAPSE, ticket)
  local raw = redis.call('HGET', TICKETS, ticket)
  if not raw then return nil end
  redis.call('HDEL', TICKETS, ticket)
  local info = cjson.decode(raw)
  local plan = by_name[info.p]
  if plan then
    redis.call('ZREM', plan.line, ticket)
    redis.call('ZREM', plan.jobs, ticket)
  end
  local who = info.p .. '\n' .. info.a
  if info.k == 'sync' then
    if redis.call('HGET', WAITING, who) == ticket then redis.call('HDEL', WAITING, who) end
  elseif redis.call('HINCRBY', WAITING, who .. '\njobs', -1) <= 0 then
    redis.call('HDEL', WAITING, who .. '\njobs')
  end
  return info
end

-- Places whose replica stopped renewing them come back (an async job's, named by the job, is an orphan now:
-- its replica died while it ran); tickets whose holders never came back leave the line.
local function tidy()
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', HELD, '-inf', now, 'LIMIT', 0, 64)) do
    release_place(member)
    local job = string.match(member, '^%d+:%d:(job_[^:]+):')
    if job then redis.call('SADD', ORPHANS, job) end
  end
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', LAPSE, '-inf', now, 'LIMIT', 0, 64)) do
    drop_ticket(ticket)
  end
end

-- The live backends and what each can hold (images), as read by `capacity`.
local live_backends = {}

-- The fleet's capacity (images), the sum of the live backends' readings within the ceiling (0: none),
-- their drain rate (images per second) and how many backends are live.
local function capacity(ceiling)
  local total, rate = 0, 0
  local entries = redis.call('HGETALL', BACKENDS)
  for i = 1, #entries, 2 do
    local images, drain, expires = string.match(entries[i + 1], '^(%d+) ([%d.]+) (%d+)$')
    if images and tonumber(expires) > now then
      total, rate = total + tonumber(images), rate + tonumber(drain)
      table.insert(live_backends, {url = entries[i], images = tonumber(images)})
    else
      redis.call('HDEL', BACKENDS, entries[i])
    end
  end
  if ceiling > 0 and total > ceiling then total = ceiling end
  return total, rate, #live_backends
end

-- The live backend with the most room, if it has room for `images`: each backend holds at most what it said.
local function roomiest(images)
  local best, most = nil, -1
  for _, backend in ipairs(live_backends) do
    local room = backend.images - held_images('at:' .. backend.url)
    if room > most then best, most = backend.url, room end
  end
  if most >= images then return best end
  return nil
end

-- Places free for `plan` now: within the capacity, and for the lowest priority within its share.
local function free_for(plan, cap, reserved)
  local free = cap - held_images('held')
  if plan.low then free = math.min(free, math.floor(cap * (1 - reserved)) - held_images('held_low')) end
  return free
end

-- The backend that takes `images` more for `plan`, after `ahead` images owed to those before it, or nil if
-- they do not fit: within the capacity and one backend's room, and for the lowest priority within its share
-- too (a request larger than the whole share needs all of it), so paid plans keep the rest.
local function fits(plan, cap, reserved, ahead, images)
  if cap - held_images('held') - ahead < images then return nil end
  if plan.low then
    local share = math.floor(cap * (1 - reserved))
    if share <= 0 or share - held_images('held_low') - ahead < math.min(images, share) then return nil end
  end
  return roomiest(images)
end

-- Tickets in the lines of plans of higher priority than `plan`: they are served first.
local function ahead_of_plan(plan)
  local ahead = 0
  for _, other in ipairs(plans) do
    if other.priority > plan.priority then ahead = ahead + redis.call('ZCARD', other.line) end
  end
  return ahead
end

-- µs until `images` more places come free for `plan`, when the pool drains `rate` images per second and the
-- plans of higher priority keep taking what they took of late (a second an image if nothing is measured).
local function wait_for(plan, images, rate)
  if images <= 0 then return 0 end
  if rate <= 0 then return images * 1000000 end
  local left = rate
  for _, other in ipairs(plans) do
    if other.priority > plan.priority then left = left - taken(other) * 1000000 / TAKEN_US end
  end
  -- However busy the higher plans, some places still come to this line (the backends age waiting work).
  return math.ceil(images / math.max(left, rate / 10) * 1000000)
end

-- µs a client told to come back may take past its turn and still go before the later turns: Retry-After is
-- whole seconds, so one back on time comes up to a second late, then its request's own way to the gateway.
local RETURN_US = 2000000

-- Tickets ahead of one due at `turn` in `plan`'s line: those of higher plans, and its own line's earlier turns
-- while its own has not come. Once it has, only the earlier sync tickets whose holders are on their way back
-- (their turn came less than RETURN_US ago) go first; those later still come after it.
local function ahead_of_turn(plan, turn)
  local ahead = ahead_of_plan(plan)
  local before = '(' .. us(turn)
  if turn > now then return ahead + redis.call('ZCOUNT', plan.line, '-inf', before) end
  local since = us(now - RETURN_US)
  return ahead + redis.call('ZCOUNT', plan.line, since, before) - redis.call('ZCOUNT', plan.jobs, since, before)
end
