"""Unit tests for kvstore.liveness: when a holder of ephemeral keys is gone or hung.

The server and the holders are faked: each ping is a future that the test
answers (or not) after a chosen delay, and that times out as
kvstore.xmpp.Session's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from kvstore.liveness import HolderPings, Holders
from protocol.errors import Timeout, Unavailable

SERVER = "localhost"
TIMEOUT = 0.05


class FakeServer:
    """Answers pings after per-JID delays; None never answers; an exception fails it."""

    def __init__(self) -> None:
        self.delays: dict[str, float | Exception | None] = {SERVER: 0.0}
        self.sent: list[str] = []

    def send_ping(self, to: str, timeout: float) -> asyncio.Future[object]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self.sent.append(to)
        behaviour = self.delays.get(to)
        if isinstance(behaviour, Exception):
            future.set_exception(behaviour)
        elif behaviour is not None:
            loop.call_later(behaviour, lambda: future.done() or future.set_result("pong"))

        def expire() -> None:
            if not future.done():
                future.set_exception(Timeout(f"no answer from {to} within {timeout:g}s"))

        loop.call_later(timeout, expire)
        return future


def make_pings(server: FakeServer, silent: list[tuple[str, str]],
               heard: Callable[[str], float] = lambda _holder: -math.inf,
               server_limit: float = 1.0) -> HolderPings:
    return HolderPings(server.send_ping, server=SERVER, timeout=TIMEOUT, heard=heard,
                       on_silent=lambda holder, reason: silent.append((holder, reason)),
                       server_limit=server_limit)


async def test_a_holder_that_answers_is_never_silent() -> None:
    server, silent = FakeServer(), []
    server.delays["a@localhost/x"] = 0.01
    pings = make_pings(server, silent)
    for _ in range(3):
        await pings.round(["a@localhost/x"])
    assert silent == []
    assert server.sent == ["a@localhost/x", SERVER] * 3  # the server is pinged after


async def test_two_silent_rounds_in_a_row_make_a_holder_hung_one_does_not() -> None:
    server, silent = FakeServer(), []
    server.delays["hung@localhost/x"] = None
    pings = make_pings(server, silent)
    await pings.round(["hung@localhost/x"])
    assert silent == []
    await pings.round(["hung@localhost/x"])
    assert [holder for holder, _ in silent] == ["hung@localhost/x"]
    assert "no answer from hung@localhost/x" in silent[0][1]


async def test_a_server_slow_to_route_the_pings_costs_nobody_their_keys() -> None:
    # The server answers the node's own ping only after 4 holder timeouts;
    # the holder answers soon after its ping is routed. By the ping's own
    # age that is silence; by the server's routing it is a prompt answer.
    server, silent = FakeServer(), []
    server.delays[SERVER] = 4 * TIMEOUT
    server.delays["idle@localhost/x"] = 4 * TIMEOUT + TIMEOUT / 5
    pings = make_pings(server, silent)
    for _ in range(3):
        await pings.round(["idle@localhost/x"])
        assert pings.missed == {}  # not even one miss
    assert silent == []


async def test_a_round_whose_server_ping_goes_unanswered_judges_nobody() -> None:
    server, silent = FakeServer(), []
    server.delays[SERVER] = None
    server.delays["hung@localhost/x"] = None
    pings = make_pings(server, silent, server_limit=0.1)
    for _ in range(3):
        await pings.round(["hung@localhost/x"])
    assert silent == []
    assert pings.missed == {}
    # Once the server answers again, silence counts again, from zero.
    server.delays[SERVER] = 0.0
    await pings.round(["hung@localhost/x"])
    assert silent == []
    await pings.round(["hung@localhost/x"])
    assert [holder for holder, _ in silent] == ["hung@localhost/x"]


async def test_an_error_from_a_server_without_ping_support_still_counts_as_routed() -> None:
    server, silent = FakeServer(), []
    server.delays[SERVER] = Unavailable("feature-not-implemented")
    server.delays["hung@localhost/x"] = None
    pings = make_pings(server, silent)
    await pings.round(["hung@localhost/x"])
    await pings.round(["hung@localhost/x"])
    assert [holder for holder, _ in silent] == ["hung@localhost/x"]


async def test_a_round_while_the_node_is_offline_judges_nobody() -> None:
    server, silent = FakeServer(), []
    offline = Unavailable("not connected")  # how the session fails every ping
    server.delays[SERVER] = offline
    server.delays["a@localhost/x"] = offline
    server.delays["b@localhost/x"] = None
    pings = HolderPings(server.send_ping, server=SERVER, timeout=TIMEOUT,
                        heard=lambda _holder: -math.inf, online=lambda: False,
                        on_silent=lambda holder, reason: silent.append((holder, reason)))
    for _ in range(3):
        await pings.round(["a@localhost/x", "b@localhost/x"])
    assert silent == []
    assert pings.missed == {}


async def test_a_request_from_the_holder_since_the_ping_proves_it_busy_not_hung() -> None:
    server, silent = FakeServer(), []
    server.delays["busy@localhost/x"] = None
    pings = make_pings(server, silent, heard=lambda _holder: time.monotonic() + 1.0)
    for _ in range(3):
        await pings.round(["busy@localhost/x"])
    assert silent == []


async def test_the_server_answering_for_a_gone_session_makes_it_silent_at_once() -> None:
    server, silent = FakeServer(), []
    server.delays["gone@localhost/x"] = Unavailable("service-unavailable")
    pings = make_pings(server, silent)
    await pings.round(["gone@localhost/x"])
    assert silent == [("gone@localhost/x", "service-unavailable")]


async def test_a_late_answer_proves_life_and_resets_the_count() -> None:
    server, silent = FakeServer(), []
    holder = "late@localhost/x"
    server.delays[holder] = 3 * TIMEOUT  # after the round's deadline, before its timer
    pings = make_pings(server, silent)
    await pings.round([holder])
    assert pings.missed == {holder: 1}
    await asyncio.sleep(3 * TIMEOUT)  # the late answer arrives
    assert pings.missed == {}
    await pings.round([holder])
    assert silent == []
    assert pings.missed == {holder: 1}


class FakeStore:
    """Deletes nothing; records whose keys the holders asked to delete."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def delete_keys(self, owner: str) -> int:
        self.deleted.append(owner)
        return 3


def make_holders(store: FakeStore, owners: list[str], grace: float = 0.05) -> Holders:
    return Holders(owners, delete_keys=store.delete_keys, send_ping=FakeServer().send_ping,
                   server=SERVER, online=lambda: True, grace=grace, ping_interval=10.0,
                   ping_timeout=TIMEOUT)


async def test_an_unavailable_holder_loses_its_keys_after_the_grace_unless_it_returns() -> None:
    store = FakeStore()
    holders = make_holders(store, ["gone@localhost/x", "back@localhost/x"])
    holders.unavailable("gone@localhost/x")
    holders.unavailable("back@localhost/x")
    holders.available("back@localhost/x")  # a reconnect within the grace
    assert store.deleted == []
    await asyncio.sleep(0.15)
    assert store.deleted == ["gone@localhost/x"]
    assert "gone@localhost/x" not in holders
    assert "back@localhost/x" in holders


async def test_a_session_that_holds_nothing_here_is_not_expired() -> None:
    store = FakeStore()
    holders = make_holders(store, ["lease:1234", "holder@localhost/x"])
    assert "lease:1234" not in holders  # a lease's keys are the lease's
    holders.unavailable("stranger@localhost/x")
    holders.heard("stranger@localhost/x")
    await asyncio.sleep(0.1)
    assert store.deleted == []
    assert holders.owners == {"holder@localhost/x"}


async def test_a_hung_holder_is_expired_by_the_ping_rounds() -> None:
    store = FakeStore()
    server = FakeServer()
    server.delays["hung@localhost/x"] = None
    server.delays["fine@localhost/x"] = 0.0
    holders = Holders(["hung@localhost/x", "fine@localhost/x"], delete_keys=store.delete_keys,
                      send_ping=server.send_ping, server=SERVER, online=lambda: True,
                      grace=1.0, ping_interval=TIMEOUT * 2, ping_timeout=TIMEOUT)
    rounds = asyncio.ensure_future(holders.run())
    try:
        deadline = time.monotonic() + 2.0
        while not store.deleted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        rounds.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rounds
    assert store.deleted == ["hung@localhost/x"]
    assert holders.owners == {"fine@localhost/x"}
