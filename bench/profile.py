"""How long and how much to measure: the default run and ``--quick``."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Sizes and time bounds of one run. Every load loop stops at a count or a time."""

    name: str
    duration: float
    """Seconds per measurement (each also stops at ``max_ops``)."""
    warmup: float
    """Seconds of unrecorded load before each measurement."""
    rounds: int
    """Rounds of every side-by-side measurement; the median throughput is reported."""
    max_ops: int
    keys: int
    """Keys pre-populated for gets (puts overwrite a set of the same size)."""
    value_bytes: int = 100
    batch_size: int = 100
    """Puts in one batch; keys in one subtree read."""
    prefix_subtrees: int = 20
    """Subtrees of ``batch_size`` keys that subtree reads rotate over."""
    list_children: int = 10_000
    watch_puts: int = 300
    """Puts whose delivery latency is measured (per watcher count)."""
    watch_fanout: int = 100
    watch_sessions: int = 10
    """Client sessions the watchers are spread over (one process)."""
    small_keys: int = 10_000
    large_keys: int = 1_000_000
    shard_count: int = 4
    memory_watchers: int = 1_000
    fake_agents: int = 1_000
    agent_resources: int = 5
    real_agents: int = 500
    agent_start_limit: float = 120.0
    """Seconds the real agents get to start and register."""


QUICK = Profile("quick", duration=2.0, warmup=0.5, rounds=1, max_ops=50_000, keys=1_000,
                watch_puts=150, large_keys=200_000, real_agents=100, agent_start_limit=60.0)
DEFAULT = Profile("default", duration=4.0, warmup=1.0, rounds=3, max_ops=200_000, keys=5_000)


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one short round per measurement and smaller sizes "
                             "(under five minutes)")
    parser.add_argument("--duration", type=float, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, help="rounds of every side-by-side measurement")
    parser.add_argument("--max-ops", type=int, help="requests per measurement at most")
    parser.add_argument("--value-bytes", type=int, help="size of every value (default 100)")
    parser.add_argument("--large-keys", type=int,
                        help="keys in the large shard (default 1,000,000; quick 200,000)")
    parser.add_argument("--real-agents", type=int,
                        help="agents started at once (default 500; quick 100)")
    parser.add_argument("--only", action="append", choices=["core", "scale", "agents"],
                        help="run only this part (repeatable); default: all")
    parser.add_argument("--dir", type=str,
                        help="folder for the servers' files (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' files (logs, LMDB, etcd data) after the run")
    args = parser.parse_args(argv)
    for name in ("duration", "rounds", "max_ops", "large_keys", "real_agents"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.value_bytes is not None and args.value_bytes < 12:
        parser.error("--value-bytes must be at least 12 (watch values carry a sequence number)")
    return args


def make_profile(args: argparse.Namespace) -> Profile:
    base = QUICK if args.quick else DEFAULT
    changes = {name: getattr(args, name)
               for name in ("duration", "rounds", "max_ops", "value_bytes", "large_keys",
                            "real_agents")
               if getattr(args, name) is not None}
    return dataclasses.replace(base, **changes)
