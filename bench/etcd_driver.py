"""etcd's load, driven from a process of its own (``python -m bench.etcd_driver``).

The etcd3 client is synchronous and keeps K requests in flight with K
threads, each holding the GIL while it builds and parses its gRPC messages.
In the benchmark's own process those threads shared one interpreter with
the store's client and the echo's requester: in quick runs the store's get
at 64 in flight came out at 0.72 of the echo with etcd's kinds among the
slices, and at 0.84-0.87 without them. Here etcd's client has a process
(and a CPU column, ``etcd-client``) of its own, as the store's client has
the benchmark's process and the echo's responder its own.

The parent sends one JSON command per line on the child's stdin and reads
one ``reply:`` line for each on its stdout; every wait is bounded. The child
exits when its stdin closes, so it also goes away if the benchmark dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.child import ChildProcess, child_main, write_line
from bench.etcd import EtcdError, EtcdLoad
from bench.load import LoadResult, threaded_closed_loop
from bench.profile import Profile
from bench.workload import Workload

_REPLY = "reply: "
_GRACE = 10.0
"""Seconds a run's last requests get after its deadline (as :func:`threaded_closed_loop`)."""


def etcd_operations(load: EtcdLoad, work: Workload, batch_size: int
                    ) -> dict[str, Callable[[int], object]]:
    """The blocking request of each etcd kind, called with the request's sequence number."""
    value = work.value
    txns = [load.puts(batch, value) for batch in work.batches]

    def get(sequence: int) -> object:
        return load.get(work.get_keys[sequence % len(work.get_keys)])

    def put(sequence: int) -> object:
        load.put(work.put_keys[sequence % len(work.put_keys)], value)
        return None

    def prefix(sequence: int) -> object:
        return load.get_prefix(work.prefixes[sequence % len(work.prefixes)] + "/", batch_size)

    def batch(sequence: int) -> object:
        load.txn(txns[sequence % len(txns)])
        return None

    return {"etcd-get": get, "etcd-put": put, "etcd-prefix": prefix, "etcd-batch": batch}


class EtcdDriver:
    """The parent's end: start the child, populate etcd, run a kind, stop."""

    def __init__(self, port: int, profile: Profile, log_path: Path,
                 request_timeout: float = 5.0) -> None:
        self.port = port
        self.profile = profile
        self.request_timeout = request_timeout
        self.child = ChildProcess("bench.etcd_driver", log_path, EtcdError)
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def start(self, timeout: float = 30.0) -> None:
        self.child.start()
        config = {"port": self.port, "timeout": self.request_timeout,
                  "profile": dataclasses.asdict(self.profile)}
        try:
            self._call(config, timeout)
        except EtcdError:
            self.stop()
            raise

    def _call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one command and wait at most ``timeout`` seconds for its reply."""
        with self._lock:
            self.child.send(command)
            reply = self.child.read_json(_REPLY, timeout)
        if "error" in reply:
            raise EtcdError(f"etcd's load driver: {reply['error']}")
        return reply

    async def populate(self, timeout: float = 300.0) -> int:
        """Write every populated key of the workload into etcd; returns how many."""
        reply = await asyncio.to_thread(self._call, {"populate": True}, timeout)
        return int(reply["keys"])

    async def run(self, kind: str, concurrency: int, max_ops: int,
                  max_seconds: float) -> LoadResult:
        """One closed-loop run of ``kind`` in the child, as :func:`threaded_closed_loop`."""
        command = {"run": kind, "concurrency": concurrency, "max_ops": max_ops,
                   "max_seconds": max_seconds}
        # The child's run ends at most a grace after its deadline; allow for the reply.
        reply = await asyncio.to_thread(self._call, command, max_seconds + _GRACE + 10.0)
        return LoadResult(concurrency, reply["ops"], reply["errors"], reply["elapsed"],
                          reply["latencies"], reply["first_error"])

    def stop(self, timeout: float = 5.0) -> None:
        self.child.close(timeout)  # closing stdin asks the child to exit


# --- the child's end ----------------------------------------------------------


def _serve(config: dict[str, Any]) -> None:
    import etcd3  # the bench extra; the parent only starts the child when it imports

    profile = Profile(**config["profile"])
    work = Workload.make(profile)
    load = EtcdLoad(etcd3, int(config["port"]), timeout=float(config["timeout"]))
    operations = etcd_operations(load, work, profile.batch_size)

    def reply(body: dict[str, Any]) -> None:
        write_line(_REPLY, body)

    reply({"ready": True})
    try:
        for line in sys.stdin.buffer:
            try:
                command = json.loads(line)
                if "populate" in command:
                    keys = work.populated_keys
                    load.populate(keys, work.value)
                    if load.get(work.get_keys[-1]) != work.value:
                        raise EtcdError("a key populated in etcd reads back a different value")
                    reply({"keys": len(keys)})
                    continue
                operation = operations[command["run"]]
                result = threaded_closed_loop(
                    operation, concurrency=int(command["concurrency"]),
                    max_ops=int(command["max_ops"]),
                    max_seconds=float(command["max_seconds"]), grace=_GRACE)
                reply({"ops": result.ops, "errors": result.errors,
                       "elapsed": result.elapsed, "latencies": result.latencies,
                       "first_error": result.first_error})
            except Exception as error:  # one bad command costs its reply, not the driver
                reply({"error": f"{type(error).__name__}: {error}"})
    finally:
        load.close()


def main() -> int:
    """Entry point of the driver's process: its settings as the first JSON line on stdin."""
    return child_main("etcd load driver", _serve)


if __name__ == "__main__":
    sys.exit(main())
