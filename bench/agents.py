"""Agents: discovery among 1,000 registered agents, and many real agents starting at once.

One private Prosody with one storage node owning ``/``:

* **Discovery**: 1,000 agents of 5 resources each are registered with
  :meth:`agent.Registry.register` under fake JIDs, through the one admin
  client (not 1,000 live sessions: the entries are the same keys a live
  agent writes, bound to the admin's session instead of each agent's).
  ``Caller.discover`` is then timed, one request at a time and with 16 in
  flight, over a rotating set of selective queries (one host, a cluster
  subtree, one slice, a region AND a role), and separately for ``/`` (all
  1,000).
* **Start-up**: N real :class:`agent.Agent` sessions (500; 100 with
  ``--quick``), each with its own account, start at once in a process of
  their own (:mod:`bench.fleet`): log in, learn the storage node from
  presence, register 5 resources (plus the ``/sys`` every agent provides)
  and watch their own entries. Reported: the wall time until the last one is
  registered, and until this process's discovery returns all of them. The
  same agents then stop and start again at once: a first start pays for
  every account's presence subscription to the node, a later one (a rolling
  restart, a new deployment) does not.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from agent import Caller
from agent.registry import Registry
from bench.cpu import CpuMeter, memory_kib
from bench.fleet import FleetProcess, real_resources
from bench.load import closed_loop, percentile
from bench.profile import Profile
from bench.runtime import Processes, guarded, progress, run_async
from kvstore.client import Client
from kvstore.config import ConnectionSettings
from kvstore.devcluster import DevCluster

ROLES = ("web", "db", "cache", "queue", "batch")
REQUEST_TIMEOUT = 30.0
"""Seconds per request of the real agents: hundreds of logins at once are slow."""
DISCOVERY_WAIT = 30.0
"""Seconds to wait, after start-up, for discovery to show every agent that started."""


def fake_resources(index: int) -> list[str]:
    """Five resources per agent; 10 clusters, 4 regions, 5 roles, one host each."""
    return [
        f"/cluster/ey{index % 10:02d}/slice/{index}",
        f"/region/r{index % 4}",
        f"/role/{ROLES[index % 5]}",
        f"/host/h{index:04d}",
        f"/os/debian{12 + index % 2}",
    ]


def queries(count: int) -> list[tuple[str, tuple[str, ...], int]]:
    """(label, resources, expected matches) for the selective discovery queries."""
    cluster = [i for i in range(count) if i % 10 == 3]
    slice_index = cluster[1] if len(cluster) > 1 else 3
    both = [i for i in range(count) if i % 4 == 1 and i % 5 == 0]
    return [
        ("one host", (f"/host/h{min(42, count - 1):04d}",), 1),
        ("cluster subtree", ("/cluster/ey03",), len(cluster)),
        ("one slice", (f"/cluster/ey03/slice/{slice_index}",), 1),
        ("region and role", ("/region/r1", "/role/web"), len(both)),
    ]


def _ms(samples: list[float], fraction: float) -> float | None:
    return round(percentile(samples, fraction) * 1000, 3) if samples else None


async def register_fakes(registry: Registry, profile: Profile, domain: str) -> dict[str, Any]:
    count = profile.fake_agents

    async def register(index: int) -> None:
        jid = f"fake{index:04d}@{domain}/agent"
        resources = fake_resources(index)[:profile.agent_resources]
        await registry.register(jid, resources, {"jid": jid, "name": f"fake{index:04d}",
                                                 "resources": resources, "operations": [],
                                                 "started": time.time()})

    result = await closed_loop(register, concurrency=32, max_ops=count, max_seconds=180.0)
    if result.ops != count:
        raise RuntimeError(f"registered {result.ops} of {count} fake agents "
                           f"({result.errors} errors; first: {result.first_error})")
    return {"agents": count, "resources_each": profile.agent_resources,
            "registered_by": "Registry.register under fake JIDs, through one admin client",
            "register_s": round(result.elapsed, 2),
            "keys_per_s": round(count * (profile.agent_resources + 1) / result.elapsed)}


async def measure_discovery(caller: Caller, profile: Profile) -> dict[str, Any]:
    chosen = queries(profile.fake_agents)
    for label, resources, expected in chosen:
        found = await caller.discover(*resources)
        if len(found) != expected:
            raise RuntimeError(f"discover {label} {resources} found {len(found)} agents, "
                               f"expected {expected}")

    async def discover(sequence: int) -> object:
        _, resources, expected = chosen[sequence % len(chosen)]
        found = await caller.discover(*resources)
        if len(found) != expected:
            raise RuntimeError(f"discover {resources}: {len(found)} agents, not {expected}")
        return found

    async def everyone(_: int) -> object:
        found = await caller.discover("/")
        if len(found) != profile.fake_agents:
            raise RuntimeError(f"discover /: {len(found)} agents, not {profile.fake_agents}")
        return found

    await closed_loop(discover, concurrency=1, max_ops=1000, max_seconds=profile.warmup)
    sequential = await closed_loop(discover, concurrency=1, max_ops=5000,
                                   max_seconds=profile.duration)
    loaded = await closed_loop(discover, concurrency=16, max_ops=20000,
                               max_seconds=profile.duration)
    whole = await closed_loop(everyone, concurrency=1, max_ops=200,
                              max_seconds=profile.duration)
    return {
        "queries": [{"label": label, "resources": list(resources), "matches": expected}
                    for label, resources, expected in chosen],
        "p50_ms": _ms(sequential.latencies, 0.5),
        "p99_ms": _ms(sequential.latencies, 0.99),
        "ops_per_s_1": round(sequential.ops_per_s, 1),
        "ops_per_s_16": round(loaded.ops_per_s, 1),
        "p50_ms_16": _ms(loaded.latencies, 0.5),
        "all_p50_ms": _ms(whole.latencies, 0.5),
        "all_p99_ms": _ms(whole.latencies, 0.99),
        "errors": sequential.errors + loaded.errors + whole.errors,
        "first_error": sequential.first_error or loaded.first_error or whole.first_error,
    }


async def start_agents(cluster: DevCluster, caller: Caller, profile: Profile
                       ) -> dict[str, Any]:
    count = profile.real_agents
    progress(f"agents: creating {count} accounts")
    settings = [cluster.settings(f"agent{i:04d}", timeout=REQUEST_TIMEOUT) for i in range(count)]
    progress(f"agents: starting {count} agents at once in a process of their own")
    first = await _start_fleet(cluster, caller, profile, settings)
    progress(f"agents: starting the same {count} agents again")
    again = await _start_fleet(cluster, caller, profile, settings)
    first["again"] = again
    return first


async def _start_fleet(cluster: DevCluster, caller: Caller, profile: Profile,
                       settings: list[ConnectionSettings]) -> dict[str, Any]:
    """Start one agent per settings at once in a fleet process, time it, stop them."""
    count = len(settings)
    fleet = FleetProcess(settings, cluster.folder / "fleet.log",
                         start_limit=profile.agent_start_limit,
                         request_timeout=REQUEST_TIMEOUT)
    node = next(iter(cluster.nodes.values()))
    clock = time.perf_counter
    try:
        await asyncio.to_thread(fleet.launch)
        meter = CpuMeter({"agents": fleet.pid, "bench": os.getpid(), "node": node.pid,
                          "prosody": cluster.prosody.pid})
        meter.start()
        begin = clock()
        report = await fleet.start()
        cpu = meter.stop()
        started: list[float] = report["started"]
        wall: float = report["wall_s"]
        # Discovery right away, then until it shows every agent that started
        # (entries of an agent the node took for dead come back when it re-registers).
        first = len(await caller.discover("/svc/bench", timeout=REQUEST_TIMEOUT))
        found, discovered = first, None
        poll_until = clock() + DISCOVERY_WAIT
        while found < len(started) and clock() < poll_until:
            await asyncio.sleep(0.5)
            found = len(await caller.discover("/svc/bench", timeout=REQUEST_TIMEOUT))
        if found >= len(started):
            discovered = clock() - begin
        progress(f"agents: {len(started)} of {count} started in {wall:.1f} s; discovery "
                 f"finds {first} at once, {found} at the end")
        stopped = await fleet.stop()
    finally:
        fleet.close()
    failures: list[str] = report["failures"]
    return {
        "agents": count,
        "resources_each": len(real_resources(0)),
        "started": len(started),
        "wall_s": round(wall, 2),
        "start_p50_s": round(percentile(started, 0.5), 2) if started else None,
        "start_p99_s": round(percentile(started, 0.99), 2) if started else None,
        "discovered_at_once": first,
        "discovered": found,
        "all_discoverable_s": round(discovered, 2) if discovered is not None else None,
        "stop_s": round(stopped["stop_s"], 2),
        "failures": count - len(started),
        "first_failure": failures[0] if failures else None,
        "stop_errors": stopped["stop_errors"],
        "cpu_percent": cpu,
        "request_timeout_s": REQUEST_TIMEOUT,
    }


async def _measure(cluster: DevCluster, profile: Profile) -> dict[str, Any]:
    client = Client(cluster.settings(), resource="bench-agents")
    node = next(iter(cluster.nodes.values()))
    try:
        await client.connect()
        caller = Caller(client)
        progress(f"agents: registering {profile.fake_agents:,} fake agents of "
                 f"{profile.agent_resources} resources")
        registration = await register_fakes(caller.registry, profile, cluster.prosody.domain)
        progress("agents: timing discovery")
        discovery = await guarded("discovery", measure_discovery(caller, profile))
        progress(f"agents: discover p50 {discovery.get('p50_ms')} ms, "
                 f"p99 {discovery.get('p99_ms')} ms")
        startup = await guarded("agent start-up", start_agents(cluster, caller, profile))
        startup["prosody_kib"] = memory_kib(cluster.prosody.pid or 0)
        startup["node_kib"] = memory_kib(node.pid or 0)
        startup.update(_node_log(node.folder / "node.log"))
        return {"registration": registration, "discovery": discovery, "startup": startup}
    finally:
        await client.close()


def _node_log(path: Path) -> dict[str, int]:
    """What the storage node logged about its agents (it logs at info level here).

    Diagnostics only: they count the node's own messages, so they read 0 if
    the node words them differently.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    # Only silence counts: when the agents stop at the end, a ping already on
    # its way is answered by the server for a session that is gone, and the
    # node logs that too ("did not answer a ping (... unavailable ...)").
    return {"node_log_ping_failures": text.count("did not answer a ping (no answer from"),
            "node_log_sessions_expired": text.count("is gone: deleted")}


def run(folder: Path, profile: Profile) -> dict[str, Any]:
    with Processes() as processes:
        # Info level: the node logs each agent it takes for dead (see _node_log).
        cluster = DevCluster(folder / "agents", shards=["/"], log_level="info")
        processes.add("the agents' cluster", cluster.stop)
        progress(f"agents: starting Prosody and a storage node under {cluster.folder}")
        cluster.start()
        return run_async(_measure(cluster, profile))
