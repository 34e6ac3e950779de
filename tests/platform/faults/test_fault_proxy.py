"""The test proxy itself: passing, refusing, freezing and resuming, on an echo server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.fixtures.fault_proxy import FaultProxy


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets it on refuse()
            while data := conn.recv(1024):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.shutdown(socket.SHUT_RDWR)
    server.close()


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(1024)


def test_pass_refuse_freeze_resume(echo: tuple[str, int]) -> None:
    with FaultProxy(echo) as proxy:
        address = (proxy.host, proxy.port)
        held = socket.create_connection(address, timeout=2)
        assert roundtrip(held, b"one") == b"one"

        proxy.freeze()
        fresh = socket.create_connection(address, timeout=2)  # the handshake still completes
        held.settimeout(0.5)
        with pytest.raises(TimeoutError):
            roundtrip(held, b"two")  # no answer while frozen
        proxy.resume()
        held.settimeout(2)
        assert held.recv(1024) == b"two"  # the held bytes go through on resume
        assert roundtrip(fresh, b"three") == b"three"

        proxy.refuse()
        with pytest.raises(OSError):  # open connections are reset
            for _ in range(3):
                if not roundtrip(held, b"four"):
                    raise ConnectionResetError("closed")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2)
        proxy.resume()
        with socket.create_connection(address, timeout=2) as again:  # the same port
            assert roundtrip(again, b"five") == b"five"
        held.close()
        fresh.close()
