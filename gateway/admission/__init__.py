"""Who is asking and may it pass: identity, refusals, shedding, cost, concurrency, idempotency, the decision."""
