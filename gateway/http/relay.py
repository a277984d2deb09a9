"""Relay an upstream's answer to the client as it arrives.

A small answer of known length is read whole and sent in one piece: the fewest sends, and a body the
upstream cuts short is still a clean 502. Others stream as they arrive.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import Send

from gateway.errors import BadGateway, asgi_headers
from gateway.upstream.forward import UpstreamAnswer

# Answers with a known length up to this size are read whole and sent in one piece; longer ones,
# and those of unknown length, are streamed as they arrive.
WHOLE_BODY_LIMIT = 1 << 20


class CutShort(Exception):
    """The upstream broke off its answer after the client had its head: the client's answer is cut short too."""


async def relay(answer: UpstreamAnswer, headers: Mapping[str, str], send: Send) -> None:
    """Send `answer` to the client, with `headers` (ours) in place of any the upstream sent of the same name.

    BadGateway if the upstream breaks off before anything was sent (the caller answers instead);
    CutShort if it breaks off once the head has gone out.
    """
    ours = asgi_headers(headers)
    taken = {name for name, _ in ours}
    head = [(name, value) for name, value in answer.raw_headers if name not in taken] + ours
    length = answer.content_length
    if length is not None and length <= WHOLE_BODY_LIMIT:
        body = await answer.read()
        head.append((b"content-length", str(len(body)).encode("latin-1")))
        await send({"type": "http.response.start", "status": answer.status, "headers": head})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": answer.status, "headers": head})
    try:
        async for chunk in answer.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except BadGateway as exc:
        raise CutShort(exc.message) from exc
    await send({"type": "http.response.body", "body": b"", "more_body": False})
