-- Take the async jobs whose replica died while they ran (their place lapsed), for a live replica to settle.
--
-- ARGV[A]  how many at most.
--
-- Returns the jobs.
tidy()
return redis.call('SPOP', ORPHANS, tonumber(ARGV[A]))
