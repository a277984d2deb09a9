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
    that gets the writer and does what it likes); it records each request and counts connections."""

    answers: list[Script]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    asked: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
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
