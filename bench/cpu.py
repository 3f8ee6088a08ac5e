"""CPU use and memory of the processes in a benchmark, read from ``/proc``.

Shows which process is the bottleneck: a process near 100% of one core is
saturated (Prosody and the Python processes each run on one core; the
storage node's commit thread can add some on top).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

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


def memory_kib(pid: int) -> dict[str, int]:
    """Resident memory of ``pid`` in KiB: ``rss`` and its parts ``anon`` and ``file``.

    ``file`` counts pages of mapped files, for a storage node mostly the
    LMDB map: they belong to the page cache and the kernel can drop them.
    ``anon`` is the process's own heap. Empty if the process is gone.
    """
    wanted = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "VmHWM:": "peak"}
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                fields = line.split()
                if fields and fields[0] in wanted:
                    found[wanted[fields[0]]] = int(fields[1])
    except (OSError, ValueError):
        return {}
    return found


def _total(pids: Sequence[int]) -> float | None:
    samples = [cpu_seconds(pid) for pid in pids]
    if any(sample is None for sample in samples):
        return None
    return sum(sample for sample in samples if sample is not None)


class CpuMeter:
    """Percent of one core each named process used between ``start`` and ``stop``.

    A name may stand for several processes (e.g. the four nodes of a sharded
    setup): their use is added up.
    """

    def __init__(self, pids: Mapping[str, int | Sequence[int] | None]) -> None:
        self.pids: dict[str, list[int]] = {}
        for name, pid in pids.items():
            if pid is None:
                continue
            self.pids[name] = [pid] if isinstance(pid, int) else list(pid)
        self._start: dict[str, float | None] = {}
        self._began = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._start = {name: _total(pids) for name, pids in self.pids.items()}

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._began
        usage: dict[str, float] = {}
        for name, pids in self.pids.items():
            before, after = self._start.get(name), _total(pids)
            if before is not None and after is not None and wall > 0:
                usage[name] = round(100.0 * (after - before) / wall, 1)
        return usage
