"""Agents end to end: registry, discovery, calls, liveness, shared configuration."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import Actor, Agent, Caller, NoProvider, Registry, matches, operation
from agent.resources import RegistryLayout
from kvstore.client import Client
from kvstore.devcluster import DevCluster
from protocol.agent import OperationFailed, UnknownOperation
from protocol.errors import BadRequest, Timeout
from protocol.model import Delete, EventType

KVSTORE = str(Path(sys.executable).with_name("kvstore"))


class Worker(Actor):
    """A test actor with a few operations of each kind."""

    @operation
    async def echo(self, value: object = None) -> object:
        return value

    @operation
    def fail(self) -> None:
        raise RuntimeError("on purpose")

    @operation
    async def sleep(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"


def spawn_agent(cluster: DevCluster, name: str, *resources: str) -> subprocess.Popen[bytes]:
    """A real ``kvstore agent`` process; returns once it is registered."""
    command = [KVSTORE, "agent", "--name", name, "--log-level", "warning"]
    for resource in resources:
        command += ["--provides", resource]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env={**os.environ, "KV_CONFIG": str(cluster.client_config)},
                               start_new_session=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(b"ready:"), line
    return process


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait(10)


# --- the matching rule and discovery ------------------------------------------


def test_matching_is_segment_wise_and_goes_both_ways() -> None:
    assert matches(["/cluster/ey04"], ["/cluster/ey04/slice/13"])
    assert matches(["/cluster/ey04/slice/13"], ["/cluster/ey04"])
    assert matches(["/"], ["/anything/at/all"])
    assert not matches(["/cluster/ey04"], ["/cluster/ey040"])
    assert not matches(["/cluster/ey040"], ["/cluster/ey04"])
    assert matches(["/cluster/ey04", "/slice/13"], ["/slice/13", "/cluster"])
    assert not matches(["/cluster/ey04"], ["/slice/13", "/cluster"])


segment = st.sampled_from(["a", "b", "ab", "c"])
resource = st.lists(segment, min_size=0, max_size=3).map(lambda s: "/" + "/".join(s))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(agents=st.dictionaries(st.sampled_from([f"a{i}@localhost/agent" for i in range(8)]),
                              st.lists(resource, min_size=1, max_size=3), max_size=8),
       queries=st.lists(st.lists(resource, min_size=1, max_size=2), min_size=1, max_size=4))
def test_discovery_agrees_with_a_brute_force_model(
        cluster: DevCluster, agents: dict[str, list[str]], queries: list[list[str]]) -> None:
    async def run() -> None:
        async with Client(cluster.settings()) as kv:
            registry = Registry(kv, RegistryLayout(f"/t/registry-{uuid.uuid4().hex[:8]}"))
            for jid, provided in agents.items():
                await registry.register(jid, sorted(set(provided)), {"jid": jid})
            for query in queries:
                model = sorted(j for j, provided in agents.items() if matches(provided, query))
                assert await registry.discover(*query) == model, query

    asyncio.run(run())


# --- calls -----------------------------------------------------------------------


async def test_call_all_gathers_results_and_errors(cluster: DevCluster) -> None:
    tag = f"/t/calls-{uuid.uuid4().hex[:8]}"
    agents = [Agent(cluster.settings(f"w{i}-{tag[-8:]}"), name=f"w{i}",
                    actors=[Worker([f"{tag}/rack/{i}"])]) for i in range(3)]
    await asyncio.gather(*(a.start() for a in agents))
    try:
        async with Client(cluster.settings()) as kv:
            caller = Caller(kv)
            replies = await caller.gather("echo", tag, args={"value": {"n": [1, 2]}})
            assert [r.jid for r in replies] == sorted(a.jid for a in agents)
            assert all(r.ok and r.result == {"n": [1, 2]} for r in replies)
            (failed,) = await caller.gather("fail", f"{tag}/rack/1")
            assert isinstance(failed.error, OperationFailed)
            assert "on purpose" in str(failed.error)
            (unknown,) = await caller.gather("nope", f"{tag}/rack/1")
            assert isinstance(unknown.error, UnknownOperation)
            (bad,) = await caller.gather("echo", f"{tag}/rack/1", args={"nonsense": 1})
            assert isinstance(bad.error, BadRequest)
            with pytest.raises(NoProvider):
                await caller.gather("echo", f"{tag}/nothing-here")
            info = (await caller.gather("info", f"{tag}/rack/2"))[0].result
            assert {"hostname", "platform", "uptime", "loadavg"} <= set(info)
            described = (await caller.gather("describe", f"{tag}/rack/2"))[0].result
            assert f"{tag}/rack/2" in described["resources"]
            assert {"echo", "fail", "sleep", "info", "describe"} <= set(described["operations"])
    finally:
        await asyncio.gather(*(a.stop() for a in agents))


async def test_call_all_returns_what_it_has_when_one_agent_hangs(
        cluster: DevCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    tag = f"/t/hang-{uuid.uuid4().hex[:8]}"
    names = [f"h{i}-{tag[-8:]}" for i in range(3)]
    processes.extend(spawn_agent(cluster, name, tag) for name in names)
    os.kill(processes[0].pid, signal.SIGSTOP)
    async with Client(cluster.settings()) as kv:
        started = time.monotonic()
        replies = await Caller(kv).gather("ping", tag, timeout=2.0)
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 4
    by_agent = {r.jid.split("@")[0]: r for r in replies}
    assert set(by_agent) == {f"agent-{n}" for n in names}
    hung = by_agent[f"agent-{names[0]}"]
    assert isinstance(hung.error, Timeout)
    assert all(by_agent[f"agent-{n}"].result == "pong" for n in names[1:])


async def test_single_scope_moves_on_until_an_agent_succeeds(cluster: DevCluster) -> None:
    tag = f"/t/single-{uuid.uuid4().hex[:8]}"

    class Picky(Worker):
        def __init__(self, ok: bool) -> None:
            super().__init__([tag])
            self.ok = ok

        @operation
        def work(self) -> str:
            if not self.ok:
                raise RuntimeError("not me")
            return "done"

    agents = [Agent(cluster.settings(f"p{i}-{tag[-8:]}"), name=f"p{i}",
                    actors=[Picky(ok=(i == 2))]) for i in range(3)]
    await asyncio.gather(*(a.start() for a in agents))
    try:
        async with Client(cluster.settings()) as kv:
            for _ in range(3):
                replies = [r async for r in Caller(kv).call("work", tag, scope="single")]
                assert [(r.jid, r.result) for r in replies] == [(agents[2].jid, "done")]
    finally:
        await asyncio.gather(*(a.stop() for a in agents))


# --- liveness ----------------------------------------------------------------


async def _until(predicate, timeout: float, step: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout}s"
        await asyncio.sleep(step)
    return time.monotonic() - started


async def test_a_killed_agent_leaves_discovery_within_two_seconds(
        cluster: DevCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    tag = f"/t/kill-{uuid.uuid4().hex[:8]}"
    name = f"k-{tag[-8:]}"
    processes.append(spawn_agent(cluster, name, tag))
    async with Client(cluster.settings()) as kv:
        registry = Registry(kv)
        (jid,) = await registry.discover(tag)
        stream = kv.watch(registry.layout.agent_key(jid))
        await stream.start()
        processes[0].kill()
        elapsed = await _until(lambda: _gone(registry, tag), 2.0)
        event = await stream.next(timeout=2)
        await stream.close()
    assert event.type is EventType.DELETE
    assert elapsed < 2.0


async def _gone(registry: Registry, resource: str) -> bool:
    return not await registry.discover(resource)


async def test_a_stopped_agent_leaves_discovery_within_fifteen_seconds(
        cluster: DevCluster, processes: list[subprocess.Popen[bytes]]) -> None:
    tag = f"/t/stop-{uuid.uuid4().hex[:8]}"
    processes.append(spawn_agent(cluster, f"s-{tag[-8:]}", tag))
    async with Client(cluster.settings()) as kv:
        registry = Registry(kv)
        assert await registry.discover(tag)
        os.kill(processes[0].pid, signal.SIGSTOP)
        elapsed = await _until(lambda: _gone(registry, tag), 15.0, step=0.25)
    assert elapsed > 2, "a paused agent should not look dead at once"


async def test_an_agent_whose_entries_vanish_registers_again(cluster: DevCluster) -> None:
    tag = f"/t/again-{uuid.uuid4().hex[:8]}"
    agent = Agent(cluster.settings(f"r-{tag[-8:]}"), name="r", actors=[Worker([tag])])
    await agent.start()
    try:
        async with Client(cluster.settings()) as kv:
            registry = Registry(kv)
            # As a node that took the agent for dead: all its entries at once.
            await kv.txn(success=[Delete(registry.layout.agent_key(agent.jid)),
                                  Delete(registry.layout.provider_key(tag, agent.jid))])
            await _until(lambda: _present(registry, tag, agent.jid), 5.0)
    finally:
        await agent.stop()


async def test_an_agent_registers_again_when_one_shard_loses_its_entries(
        make_cluster: Callable[..., DevCluster]) -> None:
    # The description lives on node1 and the resource index on node2: node2
    # alone may take the agent for dead and delete what it holds of it.
    dev = make_cluster(shards=["/", "/sys/resources"])
    agent = Agent(dev.settings("split"), name="split", actors=[Worker(["/t/a", "/t/b"])])
    await agent.start()
    try:
        async with Client(dev.settings()) as kv:
            registry = Registry(kv)
            # As the node does: every entry it holds, in one transaction.
            await kv.txn(success=[Delete(registry.layout.provider_key(resource, agent.jid))
                                  for resource in agent.resources])
            await _until(lambda: _present(registry, "/t/a", agent.jid), 5.0)
            assert await registry.discover("/t/b") == [agent.jid]
            assert (await registry.describe(agent.jid))["name"] == "split"
    finally:
        await agent.stop()


async def _present(registry: Registry, resource: str, jid: str) -> bool:
    return jid in await registry.discover(resource)


async def test_a_reconnect_within_the_grace_period_keeps_the_entries(cluster: DevCluster) -> None:
    tag = f"/t/grace-{uuid.uuid4().hex[:8]}"
    agent = Agent(cluster.settings(f"g-{tag[-8:]}"), name="g", actors=[Worker([tag])])
    await agent.start()
    try:
        async with Client(cluster.settings()) as kv:
            registry = Registry(kv)
            stream = kv.watch(registry.layout.provider_key(tag, agent.jid))
            await stream.start()
            agent.session.xmpp.abort()  # the connection drops; the agent reconnects
            await asyncio.wait_for(agent.session.online.wait(), 5)
            await asyncio.sleep(2.0)  # past the node's 1 s grace period
            assert await registry.discover(tag) == [agent.jid]
            events = []
            while True:
                try:
                    events.append(await stream.next(timeout=0.5))
                except TimeoutError:
                    break
            await stream.close()
            assert all(e.type is EventType.PUT for e in events), events
    finally:
        await agent.stop()


# --- shared configuration ---------------------------------------------------------


async def test_agents_follow_shared_configuration_without_restart(cluster: DevCluster) -> None:
    tag = f"/t/conf-{uuid.uuid4().hex[:8]}"
    async with Client(cluster.settings()) as kv:
        await kv.put(f"{tag}/web/workers", b"4")
        agents = [Agent(cluster.settings(f"c{i}-{tag[-8:]}"), name=f"c{i}") for i in range(3)]
        await asyncio.gather(*(a.start() for a in agents))
        try:
            views = [await a.config(f"{tag}/web") for a in agents]
            assert all(v.relative() == {"/workers": b"4"} for v in views)
            seen: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in agents]
            for view, queue in zip(views, seen, strict=True):
                view.add_listener(lambda event, q=queue: q.put_nowait(event.key))
            await kv.put(f"{tag}/web/workers", b"8")
            await kv.put(f"{tag}/web/timeout", b"30")
            await kv.delete(f"{tag}/web/timeout")
            for queue in seen:
                keys = [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]
                assert keys == [f"{tag}/web/workers", f"{tag}/web/timeout", f"{tag}/web/timeout"]
            assert all(v.relative() == {"/workers": b"8"} for v in views)
        finally:
            await asyncio.gather(*(a.stop() for a in agents))


# --- scale -----------------------------------------------------------------------


async def test_two_hundred_agents_register_are_discovered_and_answer(cluster: DevCluster) -> None:
    tag = f"/t/fleet-{uuid.uuid4().hex[:8]}"
    agents = [
        Agent(cluster.settings(f"f{i}-{tag[-8:]}", timeout=20), name=f"f{i}",
              actors=[Worker([f"{tag}/rack/{i % 10}", f"/t/role/{'odd' if i % 2 else 'even'}"])])
        for i in range(200)
    ]
    started = time.monotonic()
    for batch in range(0, 200, 50):
        await asyncio.gather(*(a.start() for a in agents[batch:batch + 50]))
    registered = time.monotonic() - started
    try:
        async with Client(cluster.settings()) as kv:
            caller = Caller(kv)
            assert len(await caller.discover(tag)) == 200
            rack3 = await caller.discover(f"{tag}/rack/3")
            assert rack3 == sorted(a.jid for i, a in enumerate(agents) if i % 10 == 3)
            odd_rack3 = await caller.discover(f"{tag}/rack/3", "/t/role/odd")
            assert odd_rack3 == rack3  # 3, 13, 23, ... are all odd
            assert await caller.discover(f"{tag}/rack/4", "/t/role/odd") == []
            replies = await caller.gather("echo", tag, args={"value": 7}, timeout=20)
            assert len(replies) == 200 and all(r.result == 7 for r in replies)
    finally:
        for batch in range(0, 200, 50):
            await asyncio.gather(*(a.stop() for a in agents[batch:batch + 50]))
    assert registered < 120
