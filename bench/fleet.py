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
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import Actor, Agent
from kvstore.config import ConnectionSettings
from kvstore.testing.process import stop_process, wait_for_line

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_READY = b"ready: "
_STARTED = b"started: "
_STOPPED = b"stopped: "
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
        self.log_path = log_path
        self.start_limit = start_limit
        self.request_timeout = request_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def launch(self, timeout: float = 120.0) -> None:
        """Start the child, hand it every agent's settings, wait until it has built them."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.fleet"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                cwd=PROJECT_ROOT, env=env, start_new_session=True,
            )
        assert self.process.stdin is not None
        order = {"agents": [s.to_dict() for s in self.settings],
                 "start_limit": self.start_limit, "request_timeout": self.request_timeout}
        self.process.stdin.write(json.dumps(order).encode() + b"\n")
        self.process.stdin.flush()
        self._read(_READY, timeout)

    def _send(self, line: bytes) -> None:
        process = self.process
        if process is None or process.stdin is None:
            raise FleetError("the fleet's process is not running")
        try:
            process.stdin.write(line + b"\n")
            process.stdin.flush()
        except OSError as error:
            raise FleetError(f"the fleet's process is gone ({error}); "
                             f"see {self.log_path}") from error

    def _read(self, prefix: bytes, timeout: float) -> dict[str, Any]:
        process = self.process
        if process is None:
            raise FleetError("the fleet's process is not running")
        line = wait_for_line(process, prefix, timeout)
        if not line.startswith(prefix):
            raise FleetError(f"the fleet's process did not report within {timeout:g}s "
                             f"(last output {line[:200]!r}); see {self.log_path}")
        report: dict[str, Any] = json.loads(line[len(prefix):])
        return report

    async def start(self) -> dict[str, Any]:
        """Start every agent at once; the report: ``started`` (seconds each), ``failures``."""
        self._send(b"start")
        # The child's own limit ends its start-up; allow for the report.
        return await asyncio.to_thread(self._read, _STARTED, self.start_limit + 30.0)

    async def stop(self) -> dict[str, Any]:
        """Ask the agents to stop; wait for the report: ``stop_s``, ``stop_errors``."""
        self._send(b"stop")
        return await asyncio.to_thread(self._read, _STOPPED, STOP_LIMIT + 30.0)

    def close(self, timeout: float = 5.0) -> None:
        """Make sure the child is gone (closing its stdin asks it to stop its agents)."""
        process, self.process = self.process, None
        if process is None:
            return
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            process.wait(STOP_LIMIT + timeout)
        except subprocess.TimeoutExpired:
            stop_process(process, timeout)


# --- the child's end ----------------------------------------------------------


def _report(prefix: bytes, body: dict[str, Any]) -> None:
    sys.stdout.buffer.write(prefix + json.dumps(body).encode() + b"\n")
    sys.stdout.buffer.flush()


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
    _report(_READY, {"agents": len(agents)})
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
        _report(_STARTED, {"started": started, "wall_s": clock() - begin,
                           "failures": failures})
        # Serve until told to stop; the end of stdin (the parent is gone) stops too.
        await asyncio.to_thread(sys.stdin.buffer.readline)
    finally:
        stop_begin = clock()
        results = await asyncio.gather(*(_bounded_stop(agent) for agent in agents),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        _report(_STOPPED, {"stop_s": clock() - stop_begin, "stop_errors": len(errors)})


def main() -> int:
    """Entry point of the fleet's process: its order as the first JSON line on stdin."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    try:
        asyncio.run(_run(json.loads(line)))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        print(f"fleet: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
