"""A request's header fields as one mapping: the one way every path of the gateway reads them.

ASGI servers give the names in lower case. A field sent more than once reads as its values joined
by ", " in the order sent (RFC 9110 §5.3), so two `Authorization` fields read as neither key, on
the proxied routes and on `/v1/quota` alike, and no path believes a different one of two values.
"""

from __future__ import annotations

from collections.abc import Iterable


def header_fields(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """`scope["headers"]` as a dict of lower-case names; a repeated field's values joined by ", "."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
