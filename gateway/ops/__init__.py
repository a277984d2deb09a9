"""Running it: the command line, the worker supervisor, the local stack, the admin API and account operations."""
