-- Record what one backend says it can hold and how fast it drains, until the reading lapses.
--
-- ARGV[A..]  the backend, images (0 takes it out), images per second (a decimal), ttl (µs); an empty
--            images argument forgets the backend at once.
--
-- Returns 1.
if ARGV[A + 1] == '' then
  redis.call('HDEL', BACKENDS, ARGV[A])
else
  redis.call('HSET', BACKENDS, ARGV[A], ARGV[A + 1] .. ' ' .. ARGV[A + 2] .. ' ' .. us(now + tonumber(ARGV[A + 3])))
end
return 1
