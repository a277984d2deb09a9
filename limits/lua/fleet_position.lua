-- Where a ticket stands in its line.
--
-- ARGV[A]    the ticket.
-- ARGV[A+1]  ceiling (images; 0: none).
-- ARGV[A+2]  reserved_for_paid.
--
-- Returns {position, µs until its turn}, or {} if it is not in the line. A ticket whose turn has come is
-- told how long until the places ahead of it and its own drain.
tidy()
local raw = redis.call('HGET', TICKETS, ARGV[A])
if not raw then return {} end
local info = cjson.decode(raw)
local plan = by_name[info.p]
local turn = plan and redis.call('ZSCORE', plan.line, ARGV[A])
if not turn then return {} end
turn = tonumber(turn)
local ahead = ahead_of_turn(plan, turn)
if turn > now then return {ahead + 1, turn - now} end
local cap, rate = capacity(tonumber(ARGV[A + 1]))
return {ahead + 1, wait_for(plan, ahead + info.n - free_for(plan, cap, tonumber(ARGV[A + 2])), rate)}
