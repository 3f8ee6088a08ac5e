"""The results: tables for people and one JSON object for programs.

Ratios compare each store operation with the echo at the same number of
requests in flight: ``ops/s vs echo`` is the store's throughput over the
echo's (1.0 would be the ceiling), ``p50 vs echo`` the store's median
latency over the echo's (how many times slower a typical request is), and
``vs etcd`` the store's throughput over etcd's for the same operation (above
1.0 the store is faster).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.load import LoadResult, percentile

ECHO = "echo"
ECHO_ITEM = "echo-item"
"""The echo answered with an item like a get's: the value carried, no store work."""
ECHO_PUT = "echo-put"
"""The echo carrying a value in its request and answered like a put."""


@dataclass(frozen=True)
class Kind:
    """One kind of request measured side by side with the others."""

    name: str
    system: str
    """``echo``, ``store`` or ``etcd``: which server answers it."""
    keys_per_op: int = 1
    """Keys read or written by one request (100 for a subtree read or a batch)."""
    peer: str | None = None
    """The etcd kind doing the same work, for the ``vs etcd`` ratio."""

    @property
    def client(self) -> str:
        """The process whose CPU use the table shows as the client's."""
        return "etcd-client" if self.system == "etcd" else "bench"

    @property
    def server(self) -> str:
        """The process whose CPU use the table shows as the server's."""
        return {"echo": "responder", "store": "node", "etcd": "etcd"}[self.system]


@dataclass
class Figure:
    """One kind of request at one concurrency, over every round of the run."""

    kind: str
    concurrency: int
    runs: list[LoadResult] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        """The median over runs: one per slice, or one per round for 100-key requests under load."""
        return statistics.median(run.ops_per_s for run in self.runs) if self.runs else 0.0

    def _latency_ms(self, fraction: float) -> float:
        samples = [latency for run in self.runs for latency in run.latencies]
        return percentile(samples, fraction) * 1000.0

    @property
    def p50_ms(self) -> float:
        return self._latency_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self._latency_ms(0.99)

    @property
    def ops(self) -> int:
        return sum(run.ops for run in self.runs)

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)

    @property
    def first_error(self) -> str | None:
        return next((run.first_error for run in self.runs if run.first_error), None)

    @property
    def cpu_percent(self) -> dict[str, float]:
        """The median CPU use of each process over rounds, in percent of one core."""
        names = sorted({name for sample in self.cpu for name in sample})
        return {name: round(statistics.median(s[name] for s in self.cpu if name in s), 1)
                for name in names}

    def entry(self, keys_per_op: int = 1) -> dict[str, Any]:
        """This figure as JSON-ready values."""
        entry: dict[str, Any] = {
            "ops_per_s": round(self.ops_per_s, 1),
            "p50_ms": _round(self.p50_ms, 3),
            "p99_ms": _round(self.p99_ms, 3),
            "ops": self.ops,
            "errors": self.errors,
            "rounds_ops_per_s": [round(run.ops_per_s, 1) for run in self.runs],
            "cpu_percent": self.cpu_percent,
        }
        if keys_per_op != 1:
            entry["keys_per_s"] = round(self.ops_per_s * keys_per_op, 1)
        if self.first_error:
            entry["first_error"] = self.first_error
        return entry


Figures = dict[tuple[str, int], Figure]


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator``, or None when either is missing, zero or NaN."""
    if numerator is None or not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return round(numerator / denominator, digits)


def _round(value: float | None, digits: int = 1) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def fmt(value: float | None, digits: int = 2) -> str:
    """A number with thousands separators, or ``-`` for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def echo_ratios(figures: Figures, kind: str,
                concurrency: int) -> tuple[float | None, float | None]:
    """(ops/s ratio, p50 ratio) of ``kind`` to the echo at ``concurrency``."""
    mine, echo = figures.get((kind, concurrency)), figures.get((ECHO, concurrency))
    if mine is None or echo is None:
        return None, None
    return ratio(mine.ops_per_s, echo.ops_per_s), ratio(mine.p50_ms, echo.p50_ms)


def etcd_ratio(figures: Figures, kind: Kind, concurrency: int) -> float | None:
    """The store's throughput over etcd's for the same work at ``concurrency``."""
    if kind.peer is None:
        return None
    mine, peer = figures.get((kind.name, concurrency)), figures.get((kind.peer, concurrency))
    if mine is None or peer is None:
        return None
    return ratio(mine.ops_per_s, peer.ops_per_s)


def core_table(figures: Figures, kinds: Sequence[Kind], concurrencies: Sequence[int]) -> str:
    """Throughput and latency of every kind, grouped by requests in flight."""
    header = (f"{'in flight':>9}  {'op':<12} {'ops/s':>8} {'keys/s':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'vs echo':>7} {'p50 vs echo':>11} {'vs etcd':>7} "
              f"{'errors':>6}  CPU % of a core (client / server / prosody)")
    lines = [header, "-" * len(header)]
    for concurrency in concurrencies:
        for kind in kinds:
            figure = figures.get((kind.name, concurrency))
            if figure is None:
                continue
            ops_ratio, p50_ratio = (None, None) if kind.system != "store" else \
                echo_ratios(figures, kind.name, concurrency)
            cpu = figure.cpu_percent
            usage = " / ".join(fmt(cpu.get(name), 0)
                               for name in (kind.client, kind.server, "prosody"))
            lines.append(
                f"{concurrency:>9}  {kind.name:<12} {fmt(figure.ops_per_s, 0):>8} "
                f"{fmt(figure.ops_per_s * kind.keys_per_op, 0):>9} "
                f"{fmt(figure.p50_ms):>8} {fmt(figure.p99_ms):>8} {fmt(ops_ratio):>7} "
                f"{fmt(p50_ratio):>11} {fmt(etcd_ratio(figures, kind, concurrency)):>7} "
                f"{figure.errors:>6}  {usage}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def core_summary(figures: Figures, kinds: Sequence[Kind],
                 concurrencies: Sequence[int]) -> dict[str, Any]:
    """Every core figure, and its ratios as flat keys (``get_vs_echo_16``, ...)."""
    results: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for kind in kinds:
        per_kind: dict[str, Any] = {}
        for concurrency in concurrencies:
            figure = figures.get((kind.name, concurrency))
            if figure is None:
                continue
            entry = figure.entry(kind.keys_per_op)
            name = kind.name.replace("-", "_")
            if kind.system == "store":
                ops_ratio, p50_ratio = echo_ratios(figures, kind.name, concurrency)
                entry["ops_vs_echo"] = ops_ratio
                entry["p50_vs_echo"] = p50_ratio
                flat[f"{name}_vs_echo_{concurrency}"] = ops_ratio
                flat[f"{name}_p50_vs_echo_{concurrency}"] = p50_ratio
                if kind.peer is not None:
                    versus = etcd_ratio(figures, kind, concurrency)
                    entry["ops_vs_etcd"] = versus
                    flat[f"{name}_vs_etcd_{concurrency}"] = versus
            per_kind[str(concurrency)] = entry
        results[kind.name] = per_kind
    return {"results": results, **flat}


def section(title: str, rows: Iterable[tuple[str, str]]) -> str:
    """A titled block of ``label  value`` lines."""
    rows = list(rows)
    width = max((len(label) for label, _ in rows), default=0)
    lines = [title, "-" * len(title)]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def to_json(data: dict[str, Any]) -> str:
    """One line, so it can be the last line of the output."""
    return json.dumps(data, separators=(",", ":"), sort_keys=False, default=str)
