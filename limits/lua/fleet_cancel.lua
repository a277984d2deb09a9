-- Take a ticket out of the line before its turn was served (a job cancelled).
--
-- ARGV[A]  the ticket.
--
-- Returns 1 if it was in the line (it will never start), 0 if it had left it (started, or gone).
tidy()
return drop_ticket(ARGV[A]) and 1 or 0
