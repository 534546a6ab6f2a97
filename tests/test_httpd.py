"""The loop's HTTP server (hotwire/httpd.py) on a real loopback socket: a cap on the
connections open at once, so idle clients cannot pile up in a master or worker."""

from __future__ import annotations

import asyncio

from hotwire.httpd import LoopServer, Request, response


async def _ok(req: Request, writer: asyncio.StreamWriter) -> None:
    writer.write(response(200, b"ok\n", "text/plain"))
    await writer.drain()


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _get(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_connections_over_the_cap_get_a_503_and_the_server_goes_on() -> None:
    server = LoopServer(_ok, name="test", max_connections=3)
    address = await server.start("127.0.0.1", 0)
    host, port = address.rsplit(":", 1)
    idle = []
    try:
        assert (await _get(address)).startswith(b"HTTP/1.1 200 OK")
        for _ in range(3):  # connections that never send a request
            idle.append(await asyncio.open_connection(host, int(port)))
        await _until(lambda: len(server.conns) == 3)

        reader, writer = await asyncio.open_connection(host, int(port))
        turned = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert turned.startswith(b"HTTP/1.1 503 Service Unavailable"), turned
        assert b"3 connections are open already" in turned
        assert server.refused_count == 1 and len(server.conns) == 3

        # One idle client goes: there is room again.
        idle.pop()[1].close()
        await _until(lambda: len(server.conns) == 2)
        assert (await _get(address)).startswith(b"HTTP/1.1 200 OK")
        assert server.refused_count == 1
    finally:
        for _r, w in idle:
            w.close()
        await server.close()
    assert not server.conns
