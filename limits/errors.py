"""Errors the engine raises.

LimitsError
 ├── StoreUnavailable   Redis did not answer in time, refused the connection, or failed the script
 └── ClockSkew          the Redis server's clock and the caller's disagree by more than a day
"""


class LimitsError(Exception):
    """Base of every error the engine raises."""


class StoreUnavailable(LimitsError):
    """The store could not decide: the caller chooses whether to fail open or closed."""


class ClockSkew(LimitsError):
    """The Redis server's clock is more than a day away from the caller's."""
