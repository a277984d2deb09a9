"""quotagate's gateway: the reverse proxy that decides every request against the quota engine.

A request flows one way: identity → plan → admission (one Redis call) → forward → settle
(commit or refund) → metrics and log.
"""
