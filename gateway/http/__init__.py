"""The request path in HTTP terms: the proxied request from arrival to its answer, and the few other endpoints."""
