"""Faults: dead nodes, a dead or frozen server, kill -9 under write load."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Callable

import pytest
from waits import until_deleted, until_served

from kvstore.client import Client
from kvstore.config import ConnectionSettings
from kvstore.devcluster import DevCluster
from kvstore.testing import free_port
from kvstore.xmpp import AuthenticationFailed
from protocol.errors import KvError, Timeout, Unavailable


async def test_client_learns_within_a_second_that_a_node_went_away(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/b"])
    async with Client(dev.settings()) as kv:
        await kv.put("/b/x", b"1")
        dev.kill_node("node2", signal.SIGKILL)
        started = time.monotonic()
        while kv.directory.nodes["node2@localhost"].online:
            assert time.monotonic() - started < 1.0, "presence did not report the dead node"
            await asyncio.sleep(0.01)
        # Operations on its shard fail fast; the other shard keeps working.
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await kv.get("/b/x")
        with pytest.raises(Unavailable):
            await kv.get_prefix("/", limit=10)
        assert time.monotonic() - started < 0.5
        await kv.put("/a", b"still served")
        assert (await kv.get("/a")).value == b"still served"
        # And the node is back in business once it returns.
        await asyncio.to_thread(dev.start_node, "node2")
        deadline = time.monotonic() + 5
        while not kv.directory.nodes["node2@localhost"].online:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert (await kv.get("/b/x")).value == b"1"


async def test_a_shard_whose_node_never_came_up_is_unavailable(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/b"])
    dev.kill_node("node2")
    async with Client(dev.settings()) as kv:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await kv.put("/b/x", b"1")
        assert time.monotonic() - started < 1.0
        # node1 must refuse /b keys rather than store them (it knows /b is a shard).
        with pytest.raises(KvError):
            await kv.get("/b/x")


async def test_nothing_listening_is_unavailable_at_once() -> None:
    settings = ConnectionSettings(jid="client@localhost", password="x", port=free_port(),
                                  plaintext=True, timeout=3, nodes=["node1@localhost"])
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach"):
        await Client(settings, reconnect=False).connect()
    assert time.monotonic() - started < 2


async def test_wrong_password_is_reported_as_such(cluster: DevCluster) -> None:
    settings = cluster.settings()
    settings.password = "not the password"
    with pytest.raises(AuthenticationFailed, match="refused the login"):
        await Client(settings, reconnect=False).connect()


async def test_acknowledged_writes_survive_kill_9_under_load(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster()
    acked: dict[str, bytes] = {}
    async with Client(dev.settings(timeout=2)) as kv:
        async def writer(worker: int) -> None:
            for i in range(2000):
                key, value = f"/load/w{worker}/k{i}", f"{worker}:{i}".encode()
                try:
                    await kv.put(key, value)
                except KvError:
                    return  # the node died under us: stop writing
                acked[key] = value

        writers = [asyncio.ensure_future(writer(w)) for w in range(16)]
        await asyncio.sleep(1.0)
        assert acked, "nothing was acknowledged before the kill"
        dev.kill_node("node1", signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*writers), 10)
    await asyncio.to_thread(dev.start_node, "node1")
    async with Client(dev.settings()) as kv:
        stored = {item.key: item.value for item in (await kv.get_prefix("/load")).items}
    lost = [key for key in acked if stored.get(key) != acked[key]]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost, e.g. {lost[:3]}"


async def test_a_busy_holder_keeps_its_ephemeral_keys_and_a_silent_one_loses_them(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(node_settings={"ephemeral": {"ping_interval": 0.3, "ping_timeout": 0.3}})
    async with Client(dev.settings()) as kv, \
            Client(dev.settings(), resource="holder") as holder:
        # The holder never answers a ping, as if every answer were stuck in a
        # queue behind its own traffic.
        holder.session.route("{urn:xmpp:ping}ping", lambda _request: None)
        await holder.put("/busy/key", b"1", ephemeral=True)
        # Its requests keep arriving for several ping rounds: busy, not hung.
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            await holder.get("/busy/key")
            await asyncio.sleep(0.05)
        assert (await kv.get("/busy/key")).value == b"1"
        # Silent now: two missed pings and the key goes.
        await until_deleted(kv, "/busy/key", within=3.0)


async def test_a_server_frozen_for_several_ping_rounds_costs_an_idle_holder_nothing(
        make_cluster: Callable[..., DevCluster]) -> None:
    # A busy server holds the node's pings the way a frozen one does; the
    # holder sends nothing meanwhile that would prove it alive. Silence the
    # server itself caused is no evidence against the holder.
    dev = make_cluster(node_settings={"ephemeral": {"ping_interval": 0.3, "ping_timeout": 0.3}})
    async with Client(dev.settings(timeout=5)) as kv, \
            Client(dev.settings(timeout=5), resource="idle") as holder:
        await holder.put("/idle/key", b"1", ephemeral=True)
        await asyncio.sleep(1.0)  # rounds answered in time
        dev.prosody.pause()
        try:
            await asyncio.sleep(2.0)  # six ping timeouts and more
        finally:
            dev.prosody.resume()
        await asyncio.sleep(1.5)  # rounds after the freeze
        assert (await kv.get("/idle/key")).value == b"1"
        # And a holder that does go silent still loses its keys.
        holder.session.route("{urn:xmpp:ping}ping", lambda _request: None)
        await until_deleted(kv, "/idle/key", within=3.0)


async def test_a_frozen_server_gives_timeouts_not_hangs_and_then_recovery(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster()
    async with Client(dev.settings(timeout=1)) as kv:
        await kv.put("/f/a", b"before")
        dev.prosody.pause()
        try:
            started = time.monotonic()
            with pytest.raises(Timeout):
                await kv.get("/f/a")
            assert time.monotonic() - started < 2
            await asyncio.sleep(4)
        finally:
            dev.prosody.resume()
        found = await until_served(lambda: kv.get("/f/a"), 15, "the client never recovered")
        assert found.value == b"before"


async def test_sessions_subscribe_again_after_the_server_loses_its_rosters(
        make_cluster: Callable[..., DevCluster]) -> None:
    # A server restored without its rosters (or keeping them in memory) has
    # forgotten every subscription, while each session's copy of its roster
    # still lists them. Pings are rare here, so only presence can tell the
    # node that a holder left.
    dev = make_cluster(node_settings={"ephemeral": {"ping_interval": 60}})
    async with Client(dev.settings(timeout=2)) as kv:
        await kv.put("/lost/a", b"before")
        await asyncio.to_thread(dev.prosody.stop)
        rosters = [path for path in dev.prosody.data_path.rglob("roster") if path.is_dir()]
        assert rosters, "the server kept no rosters on disk"
        for folder in rosters:
            shutil.rmtree(folder)
        await asyncio.to_thread(dev.prosody.start)
        await until_served(lambda: kv.put("/lost/b", b"after"), 15,
                           "no recovery without the rosters")
        assert (await kv.get("/lost/a")).value == b"before"
        async with Client(dev.settings(timeout=2), resource="holder") as holder:
            await holder.put("/lost/holder", b"x", ephemeral=True)
        # The node follows the holder's presence again: its key goes after
        # the grace period, long before the next ping.
        await until_deleted(kv, "/lost/holder", within=5.0)


async def test_a_restarted_node_keeps_a_live_holders_keys_and_learns_when_it_leaves(
        make_cluster: Callable[..., DevCluster]) -> None:
    # Pings are rare here: only presence can tell the restarted node that the
    # holder left, and the server sends it only because the holder announced
    # itself again to the node's new session.
    dev = make_cluster(node_settings={"ephemeral": {"ping_interval": 60}})
    async with Client(dev.settings(timeout=2)) as kv:
        async with Client(dev.settings(timeout=2), resource="holder") as holder:
            await holder.put("/back/holder", b"x", ephemeral=True)
            await asyncio.to_thread(dev.restart_node, "node1")
            await until_served(lambda: kv.get("/back/holder"), 15, "the node never came back")
            await asyncio.sleep(2.0)  # past the grace a silent holder would get
            assert (await holder.get("/back/holder")).value == b"x"
        assert await until_deleted(kv, "/back/holder", within=5.0) < 5.0


async def test_client_and_node_reconnect_after_a_server_restart(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster()
    async with Client(dev.settings(timeout=2)) as kv:
        await kv.put("/r/a", b"before")
        await asyncio.to_thread(dev.prosody.restart)
        await until_served(lambda: kv.put("/r/b", b"after"), 15, "no recovery after the restart")
        assert (await kv.get("/r/a")).value == b"before"
        assert (await kv.get("/r/b")).value == b"after"
