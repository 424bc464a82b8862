"""A TCP relay from the real node's address to the API server on loopback.

Pods on the real node reach the API server the way in-cluster clients do everywhere: the
``kubernetes`` Service's ClusterIP, which kube-proxy turns into the API server's advertised
address. A pod cannot reach 127.0.0.1 of the host, so the advertised address is the node's own
(``realnode.NODE_IP``, on an interface that exists only on this machine) and this relay listens
there and forwards each connection, bytes unchanged (TLS end to end: the serving certificate
carries the ClusterIP and the node address as SANs), to the API server on loopback.

Why a relay rather than binding the API server to every address: 0.0.0.0 would expose it on the
machine's outside interfaces too, and a bind to the node address alone would cut off the host
processes and simulated pods that use 127.0.0.1. Why not an iptables DNAT to loopback: that needs
``route_localnet`` on the pod bridge, which lets pods reach every loopback service of the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

log = logging.getLogger("relay")
_CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # Half-close first: a watch's client may still be sending while the server has finished.
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _serve_one(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                     target_host: str, target_port: int) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
    except OSError as exc:
        log.warning("cannot reach %s:%d for %s: %s", target_host, target_port,
                    client_writer.get_extra_info("peername"), exc)
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, up_writer), _pipe(up_reader, client_writer))
    finally:
        for writer in (up_writer, client_writer):
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


async def serve(listen_host: str, listen_port: int, target_host: str, target_port: int) -> None:
    """Relay until SIGTERM or SIGINT."""
    server = await asyncio.start_server(
        lambda r, w: _serve_one(r, w, target_host, target_port), listen_host, listen_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("relaying %s:%d to %s:%d", listen_host, listen_port, target_host, target_port)
    async with server:
        await stop.wait()


def run(listen: str, target: str) -> None:
    """``listen`` and ``target`` as HOST:PORT."""
    listen_host, listen_port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)
    asyncio.run(serve(listen_host, int(listen_port), target_host, int(target_port)))
