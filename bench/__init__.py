"""Benchmarks: the store against its transport's ceiling, against etcd, and at scale.

Run ``python -m bench`` (about 12 minutes) or ``python -m bench --quick``
(about 2-3 minutes). The machine is shared and small, so absolute figures
are noisy; the ratios measured side by side in one run are what to compare.

* :mod:`bench.core` -- echo, store and etcd side by side in rotating rounds; listing.
* :mod:`bench.echo` -- the ceiling: two plain slixmpp clients, one answering IQs.
* :mod:`bench.etcd` -- a private etcd on loopback and the etcd3 client's requests.
* :mod:`bench.etcd_driver` -- those requests, made from a process of their own.
* :mod:`bench.workload` -- the keys and values the store and etcd are both given.
* :mod:`bench.watch` -- watch delivery latency and events per second.
* :mod:`bench.scale` -- 10,000 vs 1,000,000 keys, 1 vs 4 shards, node memory.
* :mod:`bench.agents` -- discovery among 1,000 agents; hundreds starting at once.
* :mod:`bench.fleet` -- those hundreds of agents, run in a process of their own.
* :mod:`bench.load` -- closed-loop load generators (asyncio and threads), bounded
  in count and time.
* :mod:`bench.child` -- the helper processes (responder, etcd driver, fleet), spoken
  to in lines.
* :mod:`bench.cpu` -- CPU use and memory of the processes involved, from ``/proc``.
* :mod:`bench.report` and :mod:`bench.summary` -- the tables, targets and JSON.
* :mod:`bench.profile`, :mod:`bench.machine`, :mod:`bench.runtime` -- sizes and
  time bounds, machine facts, event loop, signals and process clean-up.
"""
