-- The pool as a whole, for metrics and brownout rules.
--
-- ARGV[A]  ceiling (images; 0: none).
--
-- Returns {capacity, rate in thousandths of an image per second, live backends, images held, then per plan:
--          images it holds, its line's length, µs a newcomer to its line would wait}.
tidy()
local cap, rate, live = capacity(tonumber(ARGV[A]))
local reply = {cap, math.floor(rate * 1000), live, held_images('held')}
for _, plan in ipairs(plans) do
  local length = redis.call('ZCARD', plan.line)
  local last = tonumber(redis.call('HGET', META, 'due:' .. plan.name) or '0')
  local wait = 0
  if length > 0 then wait = math.max(last - now, 0) end
  table.insert(reply, held_images('held:' .. plan.name))
  table.insert(reply, length)
  table.insert(reply, wait)
end
return reply
