"""``python -m bench [--quick]``: the store against its ceiling, against etcd, and at scale.

One run measures, each part through a private Prosody of its own
(:class:`kvstore.devcluster.DevCluster`):

1. **core** (:mod:`bench.core`, :mod:`bench.watch`): the raw IQ echo (the
   ceiling) at 1, 16, 64 and 256 in flight; the store's get, durable put,
   100-key subtree read, 100-put batch (``txn``) and ``put_many`` at 1, 16
   and 64 in flight; etcd (a private ``etcd`` process, :mod:`bench.etcd`,
   loaded from a process of its own, :mod:`bench.etcd_driver`) doing the
   same work with the same keys, values and concurrency; all of them in
   rotating rounds of alternating slices, side by side. Then a 10,000-child listing and
   watch delivery (latency with 1 and 100 watchers, events per second).
2. **scale** (:mod:`bench.scale`): get and put with 10,000 and with
   1,000,000 keys in the shard, and with 1 and 4 shards, in alternating
   slices; the storage node's memory with the large shard and 1,000
   watchers.
3. **agents** (:mod:`bench.agents`): discovery among 1,000 registered agents
   and 500 real agents starting at once, in a process of their own
   (:mod:`bench.fleet`).

Every measurement is bounded in count and time. Progress goes to stderr;
the tables, then one JSON object (the last line), to stdout. Every process
started is stopped at the end of its part, also on Ctrl-C or an error. If
etcd or its Python client is missing, the run says so and skips the etcd
figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import agents, core, scale
from bench.etcd import availability
from bench.machine import filesystem, load_average, machine, synced_commit_ms
from bench.profile import make_profile, parse_args
from bench.report import to_json
from bench.runtime import install_signal_handlers, progress
from bench.summary import build

PARTS = ("core", "scale", "agents")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    profile = make_profile(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_signal_handlers()

    if args.dir is not None:
        folder = Path(args.dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="kvbench-"))
    kind = filesystem(folder)
    if kind in ("tmpfs", "ramfs"):
        progress(f"warning: {folder} is on {kind}: fsync costs nothing there, "
                 "so puts look faster than durable writes on a disk; use --dir")
    etcd = availability()
    if not etcd.ok:
        progress(f"warning: the etcd figures will be skipped: {etcd.reason}")
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    meta: dict[str, Any] = {
        "benchmark": "kvstore vs raw XMPP IQ echo vs etcd; scale; agents",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "mode": profile.name,
        **{field.name: getattr(profile, field.name) for field in dataclasses.fields(profile)
           if field.name not in ("name", "duration")},
        "duration_s": profile.duration,
        "data_filesystem": kind,
        "load_average_start": load_average(),
        "synced_commit_start": synced_commit_ms(folder),
        "machine": machine(etcd.version),
        "etcd": {"available": etcd.ok, "version": etcd.version,
                 "status": (f"etcd {etcd.version} on 127.0.0.1 (private data folder), "
                            "etcd3 Python client, one thread per request in flight")
                 if etcd.ok else f"SKIPPED: {etcd.reason}"},
    }
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "core": lambda: core.run(folder, profile, etcd),
        "scale": lambda: scale.run(folder, profile),
        "agents": lambda: agents.run(folder, profile),
    }
    outcomes: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    try:
        for name in PARTS:
            if args.only and name not in args.only:
                continue
            part_began = time.monotonic()
            try:
                outcomes[name] = runners[name]()
                if "etcd_error" in outcomes[name]:
                    meta["etcd"].update(available=False,
                                        status=f"SKIPPED: {outcomes[name]['etcd_error']}")
            except KeyboardInterrupt:
                raise
            except Exception as error:
                traceback.print_exc()
                errors[name] = f"{type(error).__name__}: {error}"
                progress(f"{name}: FAILED ({errors[name]}); going on with the next part")
            progress(f"{name}: done in {time.monotonic() - part_began:.0f} s")
        meta["synced_commit_end"] = synced_commit_ms(folder)
    except KeyboardInterrupt:  # Interrupted included
        progress("interrupted: every process started has been stopped")
        return 130
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)

    meta["elapsed_s"] = round(time.monotonic() - clock, 1)
    meta["load_average_end"] = load_average()
    text, data = build(meta, outcomes, errors)
    print(text)
    print(f"whole run: {meta['elapsed_s']:.0f} s")
    print(to_json(data))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
