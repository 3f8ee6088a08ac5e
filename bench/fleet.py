"""A fleet of real agents started at once, in a process of its own (``python -m bench.fleet``).

The agents' start-up used to run in the benchmark's own process, beside the
admin client that holds the 1,000 fake agents' entries and the caller that
checks discovery. Here the fleet has a process (and a CPU column,
``agents``) of its own, as agents have machines of their own, and the
benchmark's process only asks the store what it sees. (The admin client was
taken for dead in every run; that was not its shared event loop: moved out,
it still was, until the node learned to tell a congested server from a
silent holder, see :mod:`kvstore.liveness`.)

The parent sends the agents' settings as one JSON line on the child's
stdin; the child builds every agent and writes ``ready:``. On a ``start``
line it starts them all at once and writes one ``started:`` line (each
agent's start-up time, the failures); it then keeps them serving until a
``stop`` line (or the end of its stdin), stops them and writes one
``stopped:`` line. Every wait on either side is bounded.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import Actor, Agent
from bench.child import ChildProcess, child_main, write_line
from kvstore.config import ConnectionSettings

_READY = "ready: "
_STARTED = "started: "
_STOPPED = "stopped: "
STOP_LIMIT = 30.0
"""Seconds each agent gets to unregister and log out."""


class FleetError(Exception):
    """The fleet's process did not start, answer, or stop in time."""


class BenchActor(Actor):
    """A real agent's actor: five resources, no operations of its own."""


def real_resources(index: int) -> tuple[str, ...]:
    return (f"/fleet/rack{index % 10}/a{index:04d}", f"/zone/z{index % 3}", "/svc/bench",
            f"/name/a{index:04d}", f"/tier/t{index % 2}")


class FleetProcess:
    """The parent's end: hand the child its agents, wait for them to start, stop them."""

    def __init__(self, settings: Sequence[ConnectionSettings], log_path: Path, *,
                 start_limit: float, request_timeout: float) -> None:
        self.settings = list(settings)
        self.start_limit = start_limit
        self.request_timeout = request_timeout
        self.child = ChildProcess("bench.fleet", log_path, FleetError)

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def launch(self, timeout: float = 120.0) -> None:
        """Start the child, hand it every agent's settings, wait until it has built them."""
        self.child.start()
        self.child.send({"agents": [s.to_dict() for s in self.settings],
                         "start_limit": self.start_limit,
                         "request_timeout": self.request_timeout})
        self.child.read_json(_READY, timeout)

    async def start(self) -> dict[str, Any]:
        """Start every agent at once; the report: ``started`` (seconds each), ``failures``."""
        self.child.send("start")
        # The child's own limit ends its start-up; allow for the report.
        return await asyncio.to_thread(self.child.read_json, _STARTED, self.start_limit + 30.0)

    async def stop(self) -> dict[str, Any]:
        """Ask the agents to stop; wait for the report: ``stop_s``, ``stop_errors``."""
        self.child.send("stop")
        return await asyncio.to_thread(self.child.read_json, _STOPPED, STOP_LIMIT + 30.0)

    def close(self, timeout: float = 5.0) -> None:
        """Make sure the child is gone (closing its stdin asks it to stop its agents)."""
        self.child.close(STOP_LIMIT + timeout)


# --- the child's end ----------------------------------------------------------


async def _bounded_stop(agent: Agent) -> None:
    async with asyncio.timeout(STOP_LIMIT):
        await agent.stop()


async def _run(order: dict[str, Any]) -> None:
    timeout = float(order["request_timeout"])
    agents = []
    for index, raw in enumerate(order["agents"]):
        settings = ConnectionSettings.from_dict(raw)
        agents.append(Agent(settings, name=f"agent{index:04d}",
                            actors=[BenchActor(real_resources(index))]))
    clock = time.perf_counter
    started: list[float] = []
    failures: list[str] = []
    write_line(_READY, {"agents": len(agents)})
    if (await asyncio.to_thread(sys.stdin.buffer.readline)).strip() != b"start":
        return  # the parent went away, or changed its mind

    async def start(agent: Agent) -> None:
        try:
            await agent.start(timeout=timeout)
        except Exception as error:
            failures.append(f"{type(error).__name__}: {error}")
            return
        started.append(clock() - begin)

    begin = clock()
    try:
        try:
            async with asyncio.timeout(float(order["start_limit"])):
                await asyncio.gather(*(start(agent) for agent in agents))
        except TimeoutError:
            failures.append(f"not started within {order['start_limit']:g}s")
        write_line(_STARTED, {"started": started, "wall_s": clock() - begin,
                           "failures": failures})
        # Serve until told to stop; the end of stdin (the parent is gone) stops too.
        await asyncio.to_thread(sys.stdin.buffer.readline)
    finally:
        stop_begin = clock()
        results = await asyncio.gather(*(_bounded_stop(agent) for agent in agents),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        write_line(_STOPPED, {"stop_s": clock() - stop_begin, "stop_errors": len(errors)})


def main() -> int:
    """Entry point of the fleet's process: its order as the first JSON line on stdin."""
    return child_main("fleet", lambda order: asyncio.run(_run(order)))


if __name__ == "__main__":
    sys.exit(main())
