-- Where a ticket stands in its line.
--
-- ARGV[A]  the ticket.
--
-- Returns {position, µs until its turn (0 if it has come)}, or {} if it is not in the line.
tidy()
local raw = redis.call('HGET', TICKETS, ARGV[A])
if not raw then return {} end
local plan = by_name[cjson.decode(raw).p]
local turn = plan and redis.call('ZSCORE', plan.line, ARGV[A])
if not turn then return {} end
turn = tonumber(turn)
return {ahead_of_turn(plan, turn) + 1, math.max(turn - now, 0)}
