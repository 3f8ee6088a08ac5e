"""Benchmarks: kvstore get and put against a raw XMPP IQ echo through the same Prosody.

Run ``python -m bench`` (about four minutes) or ``python -m bench --quick``
(well under two). The machine is shared and small, so absolute figures are
noisy; the ratios of the store to the echo, measured side by side in one
run, are what to compare.

* :mod:`bench.echo` -- the ceiling: two plain slixmpp clients, one answering IQs.
* :mod:`bench.load` -- a closed-loop load generator bounded in count and time.
* :mod:`bench.cpu` -- CPU use of the processes involved, from ``/proc``.
* :mod:`bench.report` -- the table and the JSON summary.
"""
