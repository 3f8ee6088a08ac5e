"""The whole run: the headline figures, the targets, the text and the JSON object.

Headline keys (all in the JSON's top level):

* ``get_vs_echo``, ``put_vs_echo``: store ops/s over the echo's, 64 in flight;
* ``get_vs_etcd``, ``put_vs_etcd``: store ops/s over etcd's, 64 in flight;
* ``seq_get_p50_vs_echo``: the store's median get latency at 1 in flight
  over the echo's;
* ``get_vs_echo_item``, ``seq_get_p50_vs_echo_item``, ``put_vs_echo_put``:
  the same ratios against the echoes shaped like a get and a put (not
  targets: they separate the store's own cost from the cost of routing the
  value), and ``echo_put_vs_etcd_put``, the ``put_vs_etcd`` that the
  transport alone would reach;
* ``batch_keys_per_s``: keys per second written by ``txn`` batches of 100
  puts, the best of 1, 16 and 64 in flight;
* ``list_10k_ms``: median milliseconds per full listing of 10,000 children;
* ``get_1m_vs_10k``, ``put_1m_vs_10k``: ops/s with the large shard (1,000,000
  keys; ``large_keys`` says how many there were) over ops/s with 10,000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import scale
from bench.core import CONCURRENCIES, ECHO_CONCURRENCIES
from bench.report import ECHO, ECHO_ITEM, ECHO_PUT, core_summary, core_table, fmt, ratio, section

TOP = 64


@dataclass(frozen=True)
class Target:
    name: str
    key: str
    threshold: float
    at_least: bool
    """True: the figure must be >= threshold; False: strictly below (or <=, see ``strict``)."""
    strict: bool = False
    digits: int = 3

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        if self.at_least:
            return value >= self.threshold
        return value < self.threshold if self.strict else value <= self.threshold

    @property
    def wanted(self) -> str:
        sign = ">=" if self.at_least else ("<" if self.strict else "<=")
        return f"{sign} {self.threshold:,g}"


TARGETS = [
    Target("get@64 vs echo", "get_vs_echo", 0.75, True),
    Target("get@64 vs etcd get", "get_vs_etcd", 1.5, True),
    Target("durable put@64 vs echo", "put_vs_echo", 0.6, True),
    Target("durable put@64 vs etcd put", "put_vs_etcd", 1.5, True),
    Target("sequential get p50 vs echo p50", "seq_get_p50_vs_echo", 1.2, False),
    Target("batch of 100 puts, keys/s", "batch_keys_per_s", 50_000, True, digits=0),
    Target("list of 10,000 children, ms", "list_10k_ms", 50, False, strict=True, digits=1),
    Target("get with 1M keys vs 10k keys", "get_1m_vs_10k", 0.8, True),
    Target("put with 1M keys vs 10k keys", "put_1m_vs_10k", 0.8, True),
]


def _figure(core: dict[str, Any] | None, kind: str, concurrency: int) -> Any:
    if core is None:
        return None
    return core["figures"].get((kind, concurrency))


def headline(outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    core, scaled = outcomes.get("core"), outcomes.get("scale")
    out: dict[str, Any] = {}

    def versus(kind: str, other: str, concurrency: int = TOP) -> float | None:
        mine, base = _figure(core, kind, concurrency), _figure(core, other, concurrency)
        return ratio(mine.ops_per_s, base.ops_per_s) if mine and base else None

    out["get_vs_echo"] = versus("get", ECHO)
    out["put_vs_echo"] = versus("put", ECHO)
    out["get_vs_etcd"] = versus("get", "etcd-get")
    out["put_vs_etcd"] = versus("put", "etcd-put")
    out["prefix_vs_etcd"] = versus("prefix", "etcd-prefix")
    out["batch_vs_etcd"] = versus("batch", "etcd-batch")
    get1 = _figure(core, "get", 1)
    for key, echo in (("", ECHO), ("_item", ECHO_ITEM)):
        echo1 = _figure(core, echo, 1)
        out[f"seq_get_p50_vs_echo{key}"] = \
            ratio(get1.p50_ms, echo1.p50_ms) if get1 and echo1 else None
    out["get_vs_echo_item"] = versus("get", ECHO_ITEM)
    out["put_vs_echo_put"] = versus("put", ECHO_PUT)
    out["echo_put_vs_etcd_put"] = versus(ECHO_PUT, "etcd-put")
    batches = [(c, _figure(core, "batch", c)) for c in CONCURRENCIES]
    batches = [(c, f) for c, f in batches if f is not None]
    if batches:
        best_c, best = max(batches, key=lambda item: item[1].ops_per_s)
        out["batch_keys_per_s"] = round(best.ops_per_s * 100)
        out["batch_keys_per_s_at"] = best_c
    else:
        out["batch_keys_per_s"] = None
    many = [_figure(core, "put_many", c) for c in CONCURRENCIES]
    out["put_many_keys_per_s"] = round(max(f.ops_per_s for f in many if f) * 100) \
        if any(many) else None
    etcd_batch = [_figure(core, "etcd-batch", c) for c in CONCURRENCIES]
    out["etcd_batch_keys_per_s"] = round(max(f.ops_per_s for f in etcd_batch if f) * 100) \
        if any(etcd_batch) else None
    out["list_10k_ms"] = core["list"].get("p50_ms") if core else None
    if scaled:
        figures = scaled["figures"]
        for op in ("get", "put"):
            out[f"{op}_1m_vs_10k"] = ratio(figures[f"{op}_large"].ops_per_s,
                                           figures[f"{op}_10k"].ops_per_s)
            out[f"{op}_4shards_vs_1"] = ratio(figures[f"{op}_sharded"].ops_per_s,
                                              figures[f"{op}_10k"].ops_per_s)
        out["large_keys"] = scaled["layout"]["large_keys"]
    else:
        out.update(get_1m_vs_10k=None, put_1m_vs_10k=None)
    return out


def check_targets(head: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"target": t.name, "key": t.key, "wanted": t.wanted, "value": head.get(t.key),
             "met": t.check(head.get(t.key)), "digits": t.digits} for t in TARGETS]


# --- text -----------------------------------------------------------------------


def _core_text(core: dict[str, Any], head: dict[str, Any]) -> list[str]:
    figures, kinds = core["figures"], core["kinds"]
    lines = ["Store, echo and etcd side by side (one Prosody; one storage node owning /)", "",
             core_table(figures, kinds, ECHO_CONCURRENCIES), "",
             "ops/s vs echo: throughput over the echo's at the same concurrency (1.0 = the "
             "transport's ceiling).",
             "echo-item, echo-put: the echo shaped like a get's answer and like a put "
             "(the value's bytes routed, none of the store's work).",
             "vs etcd: the store's throughput over etcd's for the same work (put_many is "
             "compared with etcd-batch).",
             "keys/s: ops/s x keys per request (100 for prefix, batch, put_many).", ""]
    listing = core["list"]
    title = "List (Client.list of one directory, sequential)"
    lines.append(_failed(title, listing) or section(title, [
        ("children", f"{listing['children']:,}"),
        ("ms per full listing", f"p50 {fmt(listing['p50_ms'])}, p99 {fmt(listing['p99_ms'])}, "
                                f"mean {fmt(listing['mean_ms'])} ({listing['listings']} "
                                f"listings, {listing['errors']} errors)"),
        ("names per second", f"{listing['names_per_s']:,}"),
        ("CPU % of a core", _cpu(listing["cpu_percent"])),
    ]))
    lines.append("")
    lines.append(_watch_text(core["watch"]))
    lines.append("")
    rows = [(name, fmt(head.get(name), 3 if "keys_per_s" not in name else 0))
            for name in ("get_vs_echo", "put_vs_echo", "get_vs_etcd", "put_vs_etcd",
                         "prefix_vs_etcd", "batch_vs_etcd", "seq_get_p50_vs_echo",
                         "get_vs_echo_item", "seq_get_p50_vs_echo_item", "put_vs_echo_put",
                         "echo_put_vs_etcd_put", "batch_keys_per_s",
                         "put_many_keys_per_s", "etcd_batch_keys_per_s")]
    lines.append(section("Headline ratios (64 in flight unless said otherwise)", rows))
    return lines


def _cpu(usage: dict[str, float], names: tuple[str, ...] = ("bench", "node", "prosody")) -> str:
    return " / ".join(f"{name} {fmt(usage.get(name), 0)}" for name in names)


def _failed(title: str, data: dict[str, Any]) -> str | None:
    return f"{title}: FAILED: {data['error']}" if "error" in data else None


def _watch_text(watch: dict[str, Any]) -> str:
    title = "Watch delivery (put to event, sequential puts; durable commit included)"
    if "error" in watch:
        return f"{title}: FAILED: {watch['error']}"
    one, many, flood = watch["latency_1"], watch["latency_many"], watch["throughput"]
    return section(title, [
        ("1 watcher", f"p50 {fmt(one['p50_ms'])} ms, p99 {fmt(one['p99_ms'])} ms "
                      f"({one['puts']} puts, {one['missed']} missed; put ack p50 "
                      f"{fmt(one['put_ack_p50_ms'])} ms)"),
        (f"{many['watchers']} watchers",
         f"p50 {fmt(many['p50_ms'])} ms, p99 {fmt(many['p99_ms'])} ms per delivery; "
         f"last watcher p50 {fmt(many['all_p50_ms'])} ms, p99 {fmt(many['all_p99_ms'])} ms "
         f"({many['sessions']} sessions, {many['puts']} puts, {many['missed']} missed)"),
        ("one watcher, writer flat out",
         f"{fmt(flood['events_per_s'], 0)} events/s delivered; writer "
         f"{fmt(flood['writer_ops_per_s'], 0)} puts/s at 64 in flight; "
         f"{flood['behind_when_writer_stopped']:,} events behind when the writer stopped, "
         f"drained in {flood['drain_s']} s; {flood['resubscriptions']} resubscriptions"),
        ("CPU % of a core", f"{many['watchers']} watchers: {_cpu(many['cpu_percent'])}; "
                            f"writer flat out: {_cpu(flood['cpu_percent_while_writing'])}"),
    ])


def _scale_text(scaled: dict[str, Any]) -> list[str]:
    layout, memory = scaled["layout"], scaled["memory"]
    lines = [f"Cost as the work grows ({layout['nodes']} storage nodes in one Prosody; keys "
             f"written with kvstore.storage.Engine before the nodes started, "
             f"{scaled['populate_s']} s)", "",
             scale.table(scaled["figures"], scaled["kinds"]), ""]

    def mib(sample: dict[str, int], part: str = "rss") -> str:
        return f"{sample.get(part, 0) / 1024:,.1f} MiB" if sample else "-"

    title = "Storage node memory (RSS from /proc; file = mapped LMDB pages, anon = heap)"
    failed = _failed(title, memory)
    if failed:
        return [*lines, failed]
    watched = memory["node_large_with_watchers_kib"]
    lines.append(section(title, [
        ("node, 10,000 keys", f"{mib(memory['node_10k_kib'])} "
                              f"(anon {mib(memory['node_10k_kib'], 'anon')})"),
        (f"node, {memory['large_keys']:,} keys",
         f"{mib(memory['node_large_kib'])} (anon {mib(memory['node_large_kib'], 'anon')}, "
         f"file {mib(memory['node_large_kib'], 'file')})"),
        (f"  + {memory['watchers']:,} watchers",
         f"{mib(watched)} (anon {mib(watched, 'anon')}, file {mib(watched, 'file')}); "
         f"{fmt(memory['anon_kib_per_watcher'])} KiB anon per watcher; node counts "
         f"{memory['watchers_seen_by_node']:,} watches, set up in {memory['watch_setup_s']} s"),
        ("LMDB on disk", f"{memory['lmdb_disk_bytes'] / 1048576:,.1f} MiB"),
    ]))
    return lines


def _agents_text(agents: dict[str, Any]) -> list[str]:
    registration, discovery, startup = (agents["registration"], agents["discovery"],
                                        agents["startup"])
    for title, data in (("Agents: discovery", discovery), ("Agents: start-up", startup)):
        failed = _failed(title, data)
        if failed:
            return [failed]
    labels = ", ".join(f"{q['label']} ({q['matches']})" for q in discovery["queries"])
    return [section("Agents", [
        ("registered", f"{registration['agents']:,} agents x {registration['resources_each']} "
                       f"resources, {registration['registered_by']} "
                       f"({registration['register_s']} s)"),
        ("discover, 1 in flight", f"p50 {fmt(discovery['p50_ms'])} ms, p99 "
                                  f"{fmt(discovery['p99_ms'])} ms, "
                                  f"{fmt(discovery['ops_per_s_1'], 0)}/s"),
        ("discover, 16 in flight", f"{fmt(discovery['ops_per_s_16'], 0)}/s, p50 "
                                   f"{fmt(discovery['p50_ms_16'])} ms"),
        ("queries (matches)", labels),
        ("discover / (all)", f"p50 {fmt(discovery['all_p50_ms'])} ms, p99 "
                             f"{fmt(discovery['all_p99_ms'])} ms"),
        (f"{startup['agents']} real agents at once",
         f"{startup['started']} started and registered in {startup['wall_s']} s "
         f"(each: p50 {startup['start_p50_s']} s, p99 {startup['start_p99_s']} s); "
         f"{startup['failures']} failed ({startup['first_failure'] or 'none'}); "
         f"all stopped in {startup['stop_s']} s"),
        ("  discovery after start-up",
         f"{startup['discovered_at_once']} found at once, {startup['discovered']} at the end; "
         f"all that started found at {fmt(startup['all_discoverable_s'])} s"),
        ("  node's log", f"{startup.get('node_log_ping_failures', '-')} sessions missed two "
                         f"pings in a row, {startup.get('node_log_sessions_expired', '-')} "
                         f"sessions' ephemeral keys deleted"),
        ("  CPU % of a core", _cpu(startup["cpu_percent"],
                                   ("agents", "bench", "node", "prosody"))),
        *_again_rows(startup.get("again")),
    ])]


def _again_rows(again: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The same agents started a second time: their subscriptions are in place."""
    if not again:
        return []
    return [
        ("the same agents again",
         f"{again['started']} started and registered in {again['wall_s']} s "
         f"(each: p50 {again['start_p50_s']} s, p99 {again['start_p99_s']} s); "
         f"{again['failures']} failed ({again['first_failure'] or 'none'}); "
         f"all found at {fmt(again['all_discoverable_s'])} s"),
        ("  CPU % of a core", _cpu(again["cpu_percent"], ("agents", "bench", "node", "prosody"))),
    ]


def _disk_line(meta: dict[str, Any]) -> str:
    """The synced LMDB commit alone, at the start and end: durable puts wait for one."""
    def figures(probe: dict[str, float] | None) -> str:
        if not probe:
            return "-"
        return f"{fmt(probe['1_put_ms'], 2)} ms (1 put) / {fmt(probe['26_put_ms'], 2)} ms (26 puts)"
    return (f"disk: a synced LMDB commit alone takes {figures(meta.get('synced_commit_start'))} "
            f"at the start, {figures(meta.get('synced_commit_end'))} at the end")


def render(meta: dict[str, Any], outcomes: dict[str, dict[str, Any]], head: dict[str, Any],
           targets: list[dict[str, Any]], errors: dict[str, str]) -> str:
    info = meta["machine"]
    lines = [
        f"kvstore benchmark ({meta['mode']}: {meta['rounds']} round(s) of {meta['duration_s']:g} s "
        f"per side-by-side measurement, {meta['value_bytes']}-byte values, "
        f"large shard {meta['large_keys']:,} keys, {meta['real_agents']} real agents)",
        f"machine: {info['nproc']} cores, {info['cpu_model']}; Python {info['python']}; "
        f"Prosody {info['prosody']}; etcd {info['etcd']}; data on {meta['data_filesystem']}; "
        f"load average at start {meta['load_average_start']}",
        _disk_line(meta),
        f"etcd: {meta['etcd']['status']}",
        "",
    ]
    parts: list[tuple[str, Callable[..., list[str]]]] = [
        ("core", lambda data: _core_text(data, head)),
        ("scale", _scale_text), ("agents", _agents_text)]
    for name, render_part in parts:
        if name in outcomes:
            lines += [*render_part(outcomes[name]), ""]
        elif name in errors:
            lines += [f"{name}: FAILED: {errors[name]}", ""]
    rows = []
    for target in targets:
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        shown = fmt(target["value"], target["digits"])
        rows.append((target["target"], f"{shown:>10}  wanted {target['wanted']:<9} {met}"))
    met_count = sum(1 for target in targets if target["met"])
    title = f"Targets ({met_count} of {len(targets)} met in this run)"
    if meta["large_keys"] != 1_000_000:
        title += f"; the '1M' figures used {meta['large_keys']:,} keys"
    lines.append(section(title, rows))
    return "\n".join(lines)


def build(meta: dict[str, Any], outcomes: dict[str, dict[str, Any]],
          errors: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The text for people and the JSON-ready dict of every figure."""
    head = headline(outcomes)
    targets = check_targets(head)
    data: dict[str, Any] = dict(meta)
    data.update(head)
    core = outcomes.get("core")
    if core is not None:
        data.update(core_summary(core["figures"], core["kinds"], ECHO_CONCURRENCIES))
        data["list"] = core["list"]
        data["watch"] = core["watch"]
    scaled = outcomes.get("scale")
    if scaled is not None:
        data["scale"] = scale.summary(scaled["figures"], scaled["kinds"])
        data["scale"]["layout"] = scaled["layout"]
        data["scale"]["populate_s"] = scaled["populate_s"]
        data["memory"] = scaled["memory"]
    if "agents" in outcomes:
        data["agents"] = outcomes["agents"]
    data["targets"] = targets
    data["targets_met"] = sum(1 for t in targets if t["met"])
    data["targets_total"] = len(targets)
    if errors:
        data["errors"] = errors
    return render(meta, outcomes, head, targets, errors), data
