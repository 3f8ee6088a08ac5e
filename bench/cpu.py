"""CPU use of the processes in a benchmark, read from ``/proc/PID/stat``.

Shows which process is the bottleneck: a process near 100% of one core is
saturated (Prosody and the Python processes each run on one core; the
storage node's commit thread can add some on top).
"""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds used by ``pid`` (all its threads), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


class CpuMeter:
    """Percent of one core each named process used between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float | None] = {}
        self._began = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._began
        usage: dict[str, float] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), cpu_seconds(pid)
            if before is not None and after is not None and wall > 0:
                usage[name] = round(100.0 * (after - before) / wall, 1)
        return usage
