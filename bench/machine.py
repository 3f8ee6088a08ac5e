"""Facts about the machine a run was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from kvstore.storage import Engine, PutOp


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def debian_version(package: str) -> str:
    """The installed version of a Debian package, or ``unknown``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                               capture_output=True, text=True, timeout=10)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    return "unknown"


def filesystem(path: Path) -> str:
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


def load_average() -> list[float]:
    with contextlib.suppress(OSError):
        return [round(value, 2) for value in os.getloadavg()]
    return []


def synced_commit_ms(folder: Path, commits: int = 100,
                     max_seconds: float = 3.0) -> dict[str, float]:
    """Median time of a synced LMDB commit, alone, of 1 put and of 26 puts.

    A durable put waits for such a commit, and the disk's flush time moves
    on a shared machine (26 puts took 0.34 to 1.18 ms within one evening),
    so a run records it at its start and at its end. Each size stops at
    ``commits`` commits or ``max_seconds``, whichever comes first.
    """
    path = folder / "disk-probe"
    engine = Engine(path, ["/"], map_size=1 << 26)
    try:
        engine.apply([PutOp("/", f"/probe/k{i:03d}", bytes(100)) for i in range(260)])
        figures = {}
        for size in (1, 26):
            times: list[float] = []
            deadline = time.monotonic() + max_seconds
            while len(times) < commits and time.monotonic() < deadline:
                ops = [PutOp("/", f"/probe/k{(len(times) * size + i) % 260:03d}", bytes(100))
                       for i in range(size)]
                began = time.perf_counter()
                engine.apply(ops)
                times.append(time.perf_counter() - began)
            figures[f"{size}_put_ms"] = round(statistics.median(times) * 1000, 3)
        return figures
    finally:
        engine.close()
        shutil.rmtree(path, ignore_errors=True)


def machine(etcd_version: str) -> dict[str, Any]:
    # Never `prosody --version`: that starts a server from the system config.
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "prosody": debian_version("prosody"),
        "etcd": etcd_version,
        "etcd_package": debian_version("etcd-server"),
    }
