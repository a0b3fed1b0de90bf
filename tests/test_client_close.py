"""EngineClient.close() ends what submit() started: a version probe (`protocol()`, GET /server_info) in flight when
the client closes, or whose engine goes away, or whose caller gave up, leaves no task pending and no exception
unretrieved (asyncio's "Task exception was never retrieved" / "Task was destroyed but it is pending!"), and the caller
waiting on it gets an error naming the engine URL.

The engines here are raw sockets on 127.0.0.1 that accept a connection and never answer (a hung engine), then may
die (listening socket and connections closed): no HTTP server is needed to hang or vanish mid-request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import socket
import struct
import threading
import time

import pytest

from engines.client import EngineClient, EngineDeadError, EngineError


class HungEngine:
    """Accepts connections on a free port and never answers; `die()` closes everything (connection reset)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # died
            self.conns.append(conn)
            self.accepted.set()

    def die(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); a plain close() would leave it listening
        self.sock.close()
        for conn in self.conns:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, as a crash does
            conn.close()


@pytest.fixture(autouse=True)
def _collect_earlier_garbage():
    gc.collect()  # what an earlier test left is reported there, not here


@pytest.fixture
def engine():
    e = HungEngine()
    yield e
    e.die()


def asyncio_errors(caplog) -> list[str]:
    """What asyncio reported about tasks left behind, once the garbage they were is collected."""
    gc.collect()
    return [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


def test_close_during_a_probe_fails_the_caller_naming_the_url_and_leaves_no_task(engine, caplog):
    caplog.set_level(logging.DEBUG, logger="asyncio")
    client = EngineClient([engine.url], backoff_s=0.01)
    probe = client.submit(client.protocol(engine.url))
    assert engine.accepted.wait(10)  # the /server_info request is in flight
    t0 = time.monotonic()
    client.close_sync()
    assert time.monotonic() - t0 < 10
    with pytest.raises(EngineError, match=f"{engine.url}/server_info: the engine client was closed"):
        probe.result(timeout=5)  # main: never completed (the private loop stopped under it)
    del client, probe
    assert asyncio_errors(caplog) == []


def test_engine_dying_during_a_probe_reaches_the_caller_naming_the_url(engine, caplog):
    caplog.set_level(logging.DEBUG, logger="asyncio")
    client = EngineClient([engine.url], backoff_s=0.01, max_retries=2)
    probe = client.submit(client.protocol(engine.url))
    assert engine.accepted.wait(10)
    engine.die()
    with pytest.raises(EngineDeadError, match=f"engine {engine.url} unreachable"):
        probe.result(timeout=10)
    assert engine.url not in client.alive_urls
    client.close_sync()
    del client, probe
    assert asyncio_errors(caplog) == []


def test_close_from_another_loop_ends_the_private_loops_probe(engine, caplog):
    """A trainer thread probed through submit(); the owner closes the client from its own event loop."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    client = EngineClient([engine.url], backoff_s=0.01)
    probe = client.submit(client.protocol(engine.url))
    assert engine.accepted.wait(10)
    asyncio.run(client.close())
    with pytest.raises(EngineError, match=f"{engine.url}/server_info: the engine client was closed"):
        probe.result(timeout=5)
    del client, probe
    assert asyncio_errors(caplog) == []


def test_a_task_failing_after_its_caller_gave_up_is_not_reported_unretrieved(caplog):
    """What the suite's teardown printed: the weight-sync sender's deadline and the client's request timeout were
    both 4 s; the sender cancelled the probe's future as aiohttp's timer fired, aiohttp turned the cancellation into
    TimeoutError (client.py: EngineError "/server_info: no answer within 4s"), and nobody read that exception. The
    stand-in coroutine fails on cancellation in the same way, deterministically; the client consumes the exception."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    url = "http://127.0.0.1:9"
    started = threading.Event()

    async def late_failure() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise EngineError(f"{url}/server_info: connection lost", url) from None

    client = EngineClient([url])
    future = client.submit(late_failure())
    assert started.wait(10)
    assert future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=5)
    time.sleep(0.2)  # the task ends on the private loop
    client.close_sync()
    del client, future
    assert asyncio_errors(caplog) == []


def test_the_callers_own_cancellation_stays_a_cancellation(engine):
    """Only close() turns a cut-short request into EngineError: a caller's timeout is still a timeout."""

    async def go() -> None:
        client = EngineClient([engine.url], backoff_s=0.01)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.protocol(engine.url), 0.5)
        finally:
            await client.close()

    asyncio.run(go())
