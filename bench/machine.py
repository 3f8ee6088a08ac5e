"""Facts about the machine a run was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


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
