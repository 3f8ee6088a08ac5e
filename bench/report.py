"""The results: a table for people and one JSON object for programs.

Ratios compare each store operation with the echo at the same number of
requests in flight: ``ops/s vs echo`` is the store's throughput over the
echo's (1.0 would be the ceiling), ``p50 vs echo`` the store's median
latency over the echo's (how many times slower a typical request is).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.load import LoadResult, percentile

ECHO = "echo"


@dataclass
class Figure:
    """One operation at one concurrency, over every round of the run."""

    kind: str
    concurrency: int
    runs: list[LoadResult] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        """The median over rounds (a run with one round: that round's)."""
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


def _ratio(numerator: float, denominator: float) -> float | None:
    if not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return round(numerator / denominator, 3)


def ratios(figures: dict[tuple[str, int], Figure], kind: str,
           concurrency: int) -> tuple[float | None, float | None]:
    """(ops/s ratio, p50 ratio) of ``kind`` to the echo at ``concurrency``."""
    mine, echo = figures.get((kind, concurrency)), figures.get((ECHO, concurrency))
    if mine is None or echo is None:
        return None, None
    return _ratio(mine.ops_per_s, echo.ops_per_s), _ratio(mine.p50_ms, echo.p50_ms)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table(figures: dict[tuple[str, int], Figure], kinds: list[str],
          concurrencies: list[int]) -> str:
    """A fixed-width table, grouped by requests in flight."""
    header = (f"{'in flight':>9}  {'op':<5} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'ops/s vs echo':>13} {'p50 vs echo':>11} {'errors':>6}  "
              f"CPU % of a core (bench / server / prosody)")
    lines = [header, "-" * len(header)]
    for concurrency in concurrencies:
        for kind in kinds:
            figure = figures.get((kind, concurrency))
            if figure is None:
                continue
            ops_ratio, p50_ratio = ratios(figures, kind, concurrency)
            cpu = figure.cpu_percent
            server = "responder" if kind == ECHO else "node"
            usage = " / ".join(_fmt(cpu.get(name), 0) for name in ("bench", server, "prosody"))
            lines.append(
                f"{concurrency:>9}  {kind:<5} {_fmt(figure.ops_per_s, 0):>9} "
                f"{_fmt(figure.p50_ms):>8} {_fmt(figure.p99_ms):>8} "
                f"{_fmt(ops_ratio):>13} {_fmt(p50_ratio):>11} {figure.errors:>6}  {usage}"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def summary(figures: dict[tuple[str, int], Figure], kinds: list[str],
            concurrencies: list[int], meta: dict[str, Any]) -> dict[str, Any]:
    """Every figure as one JSON-ready dict; ``get_vs_echo``/``put_vs_echo`` at most in flight."""
    results: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = dict(meta)
    for kind in kinds:
        per_kind: dict[str, Any] = {}
        for concurrency in concurrencies:
            figure = figures.get((kind, concurrency))
            if figure is None:
                continue
            entry: dict[str, Any] = {
                "ops_per_s": round(figure.ops_per_s, 1),
                "p50_ms": round(figure.p50_ms, 3),
                "p99_ms": round(figure.p99_ms, 3),
                "ops": figure.ops,
                "errors": figure.errors,
                "rounds_ops_per_s": [round(run.ops_per_s, 1) for run in figure.runs],
                "cpu_percent": figure.cpu_percent,
            }
            if figure.first_error:
                entry["first_error"] = figure.first_error
            if kind != ECHO:
                ops_ratio, p50_ratio = ratios(figures, kind, concurrency)
                entry["ops_vs_echo"] = ops_ratio
                entry["p50_vs_echo"] = p50_ratio
                out[f"{kind}_vs_echo_{concurrency}"] = ops_ratio
                out[f"{kind}_p50_vs_echo_{concurrency}"] = p50_ratio
            per_kind[str(concurrency)] = entry
        results[kind] = per_kind
    out["results"] = results
    top = max(concurrencies)
    for kind in kinds:
        if kind != ECHO:
            out[f"{kind}_vs_echo"] = ratios(figures, kind, top)[0]
    return out


def to_json(data: dict[str, Any]) -> str:
    """One line, so it can be the last line of the output."""
    return json.dumps(data, separators=(",", ":"), sort_keys=False)
