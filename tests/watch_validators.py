"""Checks over a recorded watch stream, one per guarantee etcd gives.

A stream is the list of events a watcher received, in order. ``acked`` is
what the writers know for sure: for each acknowledged write, its shard and
revision and the key it touched. Unacknowledged writes (a timeout across a
restart, say) may or may not appear; they must still obey order and
uniqueness.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from protocol.model import Event


def ordered(stream: list[Event]) -> None:
    """Within each shard, revisions never go back."""
    last: dict[str, int] = {}
    for event in stream:
        assert event.rev >= last.get(event.shard, 0), (
            f"{event.key}@{event.rev} on {event.shard} after revision {last[event.shard]}"
        )
        last[event.shard] = event.rev


def unique(stream: list[Event]) -> None:
    """No (shard, revision, key) is delivered twice."""
    seen: set[tuple[str, int, str]] = set()
    for event in stream:
        ident = (event.shard, event.rev, event.key)
        assert ident not in seen, f"duplicate event {ident}"
        seen.add(ident)


def reliable(stream: list[Event], acked: Iterable[tuple[str, int, str]]) -> None:
    """Every acknowledged write shows up."""
    seen = {(event.shard, event.rev, event.key) for event in stream}
    missing = [write for write in acked if write not in seen]
    assert not missing, f"{len(missing)} acknowledged writes never arrived, e.g. {missing[:5]}"


def atomic(stream: list[Event], sizes: dict[tuple[str, int], int]) -> None:
    """All events of one revision arrive together and complete.

    ``sizes`` maps (shard, revision) to the number of keys that revision
    changed, for the revisions the test knows.
    """
    groups: list[tuple[tuple[str, int], int]] = []
    for event in stream:
        ident = (event.shard, event.rev)
        if groups and groups[-1][0] == ident:
            groups[-1] = (ident, groups[-1][1] + 1)
        else:
            groups.append((ident, 1))
    counts: dict[tuple[str, int], list[int]] = defaultdict(list)
    for ident, count in groups:
        counts[ident].append(count)
    for ident, runs in counts.items():
        if ident in sizes:
            assert runs == [sizes[ident]], f"revision {ident} arrived as runs {runs}"


def resumable(first: list[Event], second: list[Event]) -> None:
    """A stream resumed from the first one's last revision + 1 continues it exactly."""
    if not first or not second:
        return
    last = {}
    for event in first:
        last[event.shard] = event.rev
    for event in second:
        if event.shard in last:
            assert event.rev > last[event.shard], (
                f"resumed stream repeats revision {event.rev} of {event.shard}"
            )


def check_all(stream: list[Event], acked: Iterable[tuple[str, int, str]],
              sizes: dict[tuple[str, int], int] | None = None) -> None:
    ordered(stream)
    unique(stream)
    reliable(stream, acked)
    atomic(stream, sizes or {})
