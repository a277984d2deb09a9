-- End a claimed idempotency key whose request ended charged: keep its answer for replays, or mark that
-- none was kept. Only the request that holds the claim may end it: one refunded (refund.lua) or one
-- whose lease ran out no longer does.
--
-- KEYS[1]   the idempotency record (a hash; see decide.lua).
-- KEYS[2]   the key of its kept answer.
-- ARGV[1]   the token of the request's claim.
-- ARGV[2]   the answer to keep, as the caller encoded it; '' to keep none (too big, or not all sent).
-- ARGV[3]   how long the answer is kept, ms.
-- ARGV[4]   how long the record is kept, ms; at least ARGV[3], so a replay past the answer's lifetime
--           is told it expired rather than taken for a first request.
--
-- Returns 1 if the record was ended, 0 if the request no longer held it.
local record, answer = KEYS[1], KEYS[2]
local claim, kept = ARGV[1], ARGV[2]
if redis.call('HGET', record, 'o') ~= claim then return 0 end
if kept ~= '' then
  redis.call('SET', answer, kept, 'PX', tonumber(ARGV[3]))
  redis.call('HSET', record, 's', 'a')
else
  redis.call('HSET', record, 's', 'n')
end
redis.call('HDEL', record, 'o')
redis.call('PEXPIRE', record, tonumber(ARGV[4]))
return 1
