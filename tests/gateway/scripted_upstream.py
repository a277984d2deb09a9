"""A TCP server that answers exactly the bytes a test scripts: the upstream a well-behaved library server never is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

Script = bytes | Callable[[asyncio.StreamWriter], object]


@dataclass
class Scripted:
    """For each request it reads, on any connection, it sends the next answer of `answers` (bytes, or a callable
    that gets the writer and does what it likes); it records each request and counts the connections that carried
    one. The gateway's capacity probes are answered 404 (it advertises nothing) and are neither."""

    answers: list[Script]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if head.startswith(b"GET /v1/capacity "):
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if not counted:
                    counted, self.connections = True, self.connections + 1
                self.requests.append(head + await reader.readexactly(length))
                self.asked.set()
                answer = self.answers.pop(0)
                if callable(answer):
                    result = answer(writer)
                    if asyncio.iscoroutine(result):
                        await result
                else:
                    writer.write(answer)  # in one write: the bytes go out together, as one segment on loopback
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(*answers: Script) -> AsyncIterator[Scripted]:
    """A Scripted server listening on loopback, on the running loop, until the block ends."""
    server = Scripted(list(answers))
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    async with listening:
        yield server
