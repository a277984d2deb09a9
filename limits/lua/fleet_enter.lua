-- A request asks for a place of `images` in the pool: it gets one, or a ticket in its plan's line, or a refusal.
--
-- ARGV[A..]  account, images, the place's id, the ticket's id, the line it may join ('sync': its holder
--            comes back at its turn; 'job': the fleet runs it then; '': none), reserved_for_paid (the share
--            the lowest priority may not take), ceiling (images; 0: none), place ttl (µs), grace (µs a sync
--            ticket is kept past its turn), the places one account may hold in the line (its ticket and its
--            jobs), the line's length cap, and the request's plan.
--
-- A request is let in when the places its plan may take cover it and everyone ahead of it: every ticket of
-- a higher plan, and every ticket of its own line, unless it is a ticket holder whose turn has come.
-- Returns {1, place, capacity, backend}   admitted: the place, on that backend, is held until released or lapsed
--         {0, ticket, position, wait µs, capacity, rate in thousandths of an image per second}   in the line
--         {-1, reason, capacity[, wait µs]}   refused: no_capacity, too_large (over the whole capacity),
--                                  line_full (with the wait of the line's last turn) or account_places
tidy()
local account, images = ARGV[A], tonumber(ARGV[A + 1])
local place_id, ticket, queue = ARGV[A + 2], ARGV[A + 3], ARGV[A + 4]
local reserved, ceiling = tonumber(ARGV[A + 5]), tonumber(ARGV[A + 6])
local ttl, grace = tonumber(ARGV[A + 7]), tonumber(ARGV[A + 8])
local account_places, line_cap = tonumber(ARGV[A + 9]), tonumber(ARGV[A + 10])
local plan = by_name[ARGV[A + 11]]
local cap, rate, live = capacity(ceiling)
if live == 0 or cap == 0 then return {-1, 'no_capacity', 0} end  -- none live, or every one still loading
local rate_milli = math.floor(rate * 1000)
local who = plan.name .. '\n' .. account

-- The account's ticket in this line, if it has one: it comes back for its turn.
local held = queue == 'sync' and redis.call('HGET', WAITING, who)
local turn = held and redis.call('ZSCORE', plan.line, held)
if turn then
  turn = tonumber(turn)
  local ahead = ahead_of_turn(plan, turn)
  local backend = fits(plan, cap, reserved, ahead, images)
  if backend then
    drop_ticket(held)
    return {1, take_place(plan, images, place_id, ttl, backend), cap, backend}
  end
  local wait = turn - now
  if wait <= 0 then  -- its turn came and the places are not free yet: it is told when they will be
    wait = wait_for(plan, ahead + images - free_for(plan, cap, reserved), rate)
    redis.call('ZADD', plan.line, us(now + wait), held)
    redis.call('ZADD', LAPSE, us(now + wait + grace), held)
  end
  return {0, held, ahead + 1, wait, cap, rate_milli}
end
if held then redis.call('HDEL', WAITING, who) end  -- a claim on a ticket that has left the line

if images > cap then return {-1, 'too_large', cap} end
local ahead = ahead_of_plan(plan) + redis.call('ZCARD', plan.line)
local backend = fits(plan, cap, reserved, ahead, images)
if backend then
  return {1, take_place(plan, images, place_id, ttl, backend), cap, backend}
end
if queue == '' then return {-1, 'no_place', cap} end
local last = tonumber(redis.call('HGET', META, 'due:' .. plan.name) or '0')
if redis.call('ZCARD', plan.line) >= line_cap then return {-1, 'line_full', cap, math.max(last - now, 0)} end
-- Its places in the line: its async jobs and its ticket, together at most its plan's number.
local mine = tonumber(redis.call('HGET', WAITING, who .. '\njobs') or '0') + redis.call('HEXISTS', WAITING, who)
if mine >= account_places then return {-1, 'account_places', cap} end

-- Its turn: when the places of everyone ahead and its own will have drained, and never before the turn
-- told to anyone ahead of it in this line.
local due = now + wait_for(plan, ahead + images - free_for(plan, cap, reserved), rate)
if due <= last then due = last + 1 end  -- strictly later: equal turns would be ordered by their random ids
redis.call('HSET', META, 'due:' .. plan.name, us(due))
redis.call('ZADD', plan.line, us(due), ticket)
redis.call('HSET', TICKETS, ticket, cjson.encode({k = queue, n = images, p = plan.name, a = account}))
if queue == 'sync' then
  redis.call('HSET', WAITING, who, ticket)
  redis.call('ZADD', LAPSE, us(due + grace), ticket)
else
  redis.call('ZADD', plan.jobs, us(due), ticket)
  redis.call('HINCRBY', WAITING, who .. '\njobs', 1)
end
return {0, ticket, ahead + 1, due - now, cap, rate_milli}
