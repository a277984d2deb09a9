-- A replica takes the first async job whose place has come, to run it: highest plan first, FIFO within one.
--
-- ARGV[A..]  reserved_for_paid, ceiling (images; 0: none), place ttl (µs). The place is named by the job, so
--            that a place which lapses while its job runs makes the job an orphan (fleet.lua, tidy).
--
-- Returns {job, place, its turn (µs), now (µs), the backend it goes to}, or {} when no job can start now.
tidy()
local reserved, ceiling, ttl = tonumber(ARGV[A]), tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2])
local cap = capacity(ceiling)
for _, plan in ipairs(plans) do
  local head = redis.call('ZRANGE', plan.jobs, 0, 0, 'WITHSCORES')
  if head[1] then
    local job, turn = head[1], tonumber(head[2])
    local info = cjson.decode(redis.call('HGET', TICKETS, job))
    local backend = fits(plan, cap, reserved, ahead_of_turn(plan, turn), info.n)
    if backend then
      drop_ticket(job)
      return {job, take_place(plan, info.n, job, ttl, backend), turn, now, backend}
    end
  end
end
return {}
