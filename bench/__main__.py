"""``python -m bench [--quick]``: the store against the raw XMPP echo, side by side.

One run starts one private Prosody (through :class:`kvstore.devcluster.DevCluster`,
with one storage node owning ``/``) and an echo responder, then measures
through that same server, at 1, 16 and 64 requests in flight:

* ``echo`` -- the ceiling: a raw IQ round trip between two plain slixmpp clients;
* ``get``  -- ``Client.get`` of pre-populated keys with fixed-size values;
* ``put``  -- ``Client.put`` of fixed-size values, durable (synced LMDB group commit).

Every measurement is preceded by a short warm-up and bounded both in count and
in time. The default run repeats every measurement in several rounds, in a
rotating order, and reports the median throughput; ``--quick`` runs one short
round. Progress goes to stderr; the table, then one JSON object (the last
line), to stdout. Every process started is stopped at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.cpu import CpuMeter
from bench.echo import EchoRequester, ResponderProcess
from bench.load import LoadResult, Operation, closed_loop
from bench.report import ECHO, Figure, summary, table, to_json
from kvstore.client import Client
from kvstore.devcluster import DevCluster

T = TypeVar("T")

KINDS = [ECHO, "get", "put"]
CONCURRENCIES = [1, 16, 64]


@dataclass(frozen=True)
class Profile:
    """How long and how often to measure."""

    name: str
    duration: float
    """Seconds per measurement (each also stops at ``max_ops``)."""
    warmup: float
    """Seconds of unrecorded load before each measurement."""
    rounds: int
    max_ops: int
    keys: int
    """Keys pre-populated for gets (and, separately, overwritten by puts)."""
    value_bytes: int = 100


QUICK = Profile("quick", duration=3.0, warmup=0.5, rounds=1, max_ops=50_000, keys=1_000)
DEFAULT = Profile("default", duration=7.0, warmup=1.0, rounds=3, max_ops=200_000, keys=5_000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one short round per measurement (well under two minutes)")
    parser.add_argument("--duration", type=float, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, help="rounds of every measurement")
    parser.add_argument("--max-ops", type=int, help="requests per measurement at most")
    parser.add_argument("--value-bytes", type=int, help="size of every value (default 100)")
    parser.add_argument("--dir", type=Path,
                        help="folder for the servers' files (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' files (logs, LMDB) after the run")
    args = parser.parse_args(argv)
    for name in ("duration", "rounds", "max_ops", "value_bytes"):
        value = getattr(args, name)
        if value is not None and value <= 0 and not (name == "value_bytes" and value == 0):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def make_profile(args: argparse.Namespace) -> Profile:
    base = QUICK if args.quick else DEFAULT
    return Profile(
        name=base.name,
        duration=args.duration or base.duration,
        warmup=base.warmup,
        rounds=args.rounds or base.rounds,
        max_ops=args.max_ops or base.max_ops,
        keys=base.keys,
        value_bytes=base.value_bytes if args.value_bytes is None else args.value_bytes,
    )


# --- the machine ----------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _prosody_version() -> str:
    # Never `prosody --version`: that starts a server from the system config.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "prosody"],
                               capture_output=True, text=True, timeout=10)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    return "unknown"


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs makes fsync free)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1]
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "prosody": _prosody_version(),
    }


# --- measuring ------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def populate(client: Client, keys: list[str], value: bytes, max_seconds: float) -> None:
    """Write ``value`` under every key, 64 in flight; fail unless every put succeeds."""
    async def put(sequence: int) -> object:
        return await client.put(keys[sequence], value)

    result = await closed_loop(put, concurrency=64, max_ops=len(keys), max_seconds=max_seconds)
    if result.ops != len(keys):
        raise RuntimeError(f"populating wrote {result.ops} of {len(keys)} keys "
                           f"({result.errors} errors; first: {result.first_error})")


async def measure(operation: Operation, concurrency: int, profile: Profile,
                  meter: CpuMeter) -> tuple[LoadResult, dict[str, float]]:
    """A warm-up, then one bounded, recorded run with the CPU use of every process."""
    await closed_loop(operation, concurrency=concurrency, max_ops=profile.max_ops,
                      max_seconds=profile.warmup)
    meter.start()
    result = await closed_loop(operation, concurrency=concurrency, max_ops=profile.max_ops,
                               max_seconds=profile.duration)
    return result, meter.stop()


async def run_benchmarks(cluster: DevCluster, responder: ResponderProcess,
                         profile: Profile) -> dict[tuple[str, int], Figure]:
    requester = EchoRequester(cluster.settings("bench-echo"), responder.jid)
    client = Client(cluster.settings(), resource="bench")
    try:
        await requester.start()
        await client.connect()

        value = bytes(i % 256 for i in range(profile.value_bytes))
        get_keys = [f"/bench/get/k{i:06d}" for i in range(profile.keys)]
        put_keys = [f"/bench/put/k{i:06d}" for i in range(profile.keys)]
        _progress(f"populating {len(get_keys):,} keys of {len(value)} bytes")
        await populate(client, get_keys, value, max_seconds=120.0)
        if (await client.get(get_keys[-1])).value != value:
            raise RuntimeError("a populated key reads back a different value")

        def echo(_: int) -> asyncio.Future[None]:
            return requester.request()

        async def get(sequence: int) -> object:
            return await client.get(get_keys[sequence % len(get_keys)])

        async def put(sequence: int) -> object:
            return await client.put(put_keys[sequence % len(put_keys)], value)

        operations: dict[str, Callable[[int], Any]] = {ECHO: echo, "get": get, "put": put}
        node = next(iter(cluster.nodes.values()))
        meter = CpuMeter({"bench": os.getpid(), "responder": responder.pid,
                          "node": node.pid, "prosody": cluster.prosody.pid})
        figures = {(kind, c): Figure(kind, c) for kind in KINDS for c in CONCURRENCIES}
        for round_number in range(profile.rounds):
            # Rotate the order each round so no operation always follows the same one.
            order = KINDS[round_number % len(KINDS):] + KINDS[:round_number % len(KINDS)]
            for concurrency in CONCURRENCIES:
                for kind in order:
                    result, cpu = await measure(operations[kind], concurrency, profile, meter)
                    figure = figures[(kind, concurrency)]
                    figure.runs.append(result)
                    figure.cpu.append(cpu)
                    _progress(
                        f"round {round_number + 1}/{profile.rounds}  {concurrency:>2} in flight  "
                        f"{kind:<4} {result.ops_per_s:>8,.0f} ops/s  "
                        f"p50 {result.percentile_ms(0.5):6.2f} ms  "
                        f"p99 {result.percentile_ms(0.99):6.2f} ms  errors {result.errors}")
        return figures
    finally:
        try:
            await client.close()
        finally:
            await requester.stop()


# --- orchestration ----------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def _install_signal_handlers() -> None:
    # Outside the event loop: raise at once, so cluster start-up is abandoned
    # and the cleanup runs. Installed explicitly, even if a shell made this
    # process ignore SIGINT.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)


def run_async(main: Coroutine[Any, Any, T], cleanup_timeout: float = 5.0) -> T:
    """Run ``main`` on a fresh event loop; Ctrl-C or SIGTERM cancel it cleanly.

    Inside the loop a signal only cancels the main task, so every ``finally``
    runs (the clients log out); tasks still left then get ``cleanup_timeout``
    seconds to end before the loop is closed regardless. Raises Interrupted
    if a signal ended the run.
    """
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if signalled:
            raise Interrupted(f"signal {signalled[0]}") from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        _install_signal_handlers()
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for leftover in left:
            leftover.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=cleanup_timeout))
        loop.close()


def _cleanup(responder: ResponderProcess | None, cluster: DevCluster, folder: Path,
             remove: bool) -> None:
    """Stop every process started, immune to a second Ctrl-C while doing it."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if responder is not None:
            responder.stop()
        cluster.stop()
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = make_profile(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _install_signal_handlers()

    if args.dir is not None:
        folder = args.dir.resolve()
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="kvbench-"))
    filesystem = _filesystem(folder)
    if filesystem in ("tmpfs", "ramfs"):
        _progress(f"warning: {folder} is on {filesystem}: fsync costs nothing there, "
                  "so puts look faster than durable writes on a disk; use --dir")
    started = datetime.datetime.now(datetime.UTC)
    cluster = DevCluster(folder / "cluster", shards=["/"], log_level="warning")
    responder: ResponderProcess | None = None
    try:
        _progress(f"starting Prosody and a storage node under {folder}")
        cluster.start()
        responder = ResponderProcess(cluster.settings("bench-responder"),
                                     folder / "responder.log")
        responder.start()
        figures = run_async(run_benchmarks(cluster, responder, profile))
    except KeyboardInterrupt:  # Interrupted included
        _progress("interrupted: stopping every process started")
        return 130
    finally:
        _cleanup(responder, cluster, folder, remove=not args.keep and args.dir is None)

    meta: dict[str, Any] = {
        "benchmark": "kvstore get/put vs raw XMPP IQ echo",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "mode": profile.name,
        "duration_s": profile.duration,
        "warmup_s": profile.warmup,
        "rounds": profile.rounds,
        "max_ops": profile.max_ops,
        "value_bytes": profile.value_bytes,
        "keys": profile.keys,
        "concurrencies": CONCURRENCIES,
        "data_filesystem": filesystem,
        "machine": machine(),
    }
    data = summary(figures, KINDS, CONCURRENCIES, meta)
    info = meta["machine"]
    print(f"kvstore benchmark ({profile.name}: {profile.rounds} round(s) of "
          f"{profile.duration:g} s per measurement, {profile.value_bytes}-byte values)")
    print(f"machine: {info['nproc']} cores, {info['cpu_model']}; Python {info['python']}; "
          f"Prosody {info['prosody']}; data on {filesystem}")
    print()
    print(table(figures, KINDS, CONCURRENCIES))
    print()
    print("ops/s vs echo: throughput over the echo's at the same concurrency (1.0 = ceiling).")
    print("p50 vs echo: median latency over the echo's. Absolute figures are noisy; "
          "compare ratios.")
    errors = sum(figure.errors for figure in figures.values())
    if errors:
        print(f"warning: {errors} requests failed; see first_error in the JSON")
    print(to_json(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
