"""The ``kv`` executable, run as a subprocess against the real cluster.

Every run is bounded by a timeout. Failures must exit with the documented
code (1 not found or compare failed, 2 bad input, 3 store unreachable) and
explain themselves in exactly one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from kvstore.client import Client
from kvstore.devcluster import DevCluster
from kvstore.testing.prosody import free_port
from protocol.errors import KeyNotFound

KV = Path(sys.executable).parent / "kv"
RUN_TIMEOUT = 30.0
NODE_VALUE_LIMIT = 128 * 1024


@dataclass
class Result:
    code: int
    out: bytes
    err: bytes

    @property
    def lines(self) -> list[str]:
        return self.out.decode().splitlines()


Runner = Callable[..., Awaitable[Result]]


async def run_kv(*args: str | bytes, env: dict[str, str], stdin: bytes | None = None,
                 timeout: float = RUN_TIMEOUT) -> Result:
    process = await asyncio.create_subprocess_exec(
        str(KV), *args, env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"kv {args!r} did not finish within {timeout}s")
    assert process.returncode is not None
    return Result(process.returncode, out, err)


def base_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "KV_CONFIG"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def cli(cluster: DevCluster) -> Runner:
    """Run ``kv`` with KV_CONFIG pointing at the session cluster."""
    env = {**base_env(), "KV_CONFIG": str(cluster.client_config)}

    async def run(*args: str | bytes, stdin: bytes | None = None,
                  timeout: float = RUN_TIMEOUT) -> Result:
        return await run_kv(*args, env=env, stdin=stdin, timeout=timeout)

    return run


@pytest_asyncio.fixture(autouse=True)
async def _collect_sessions() -> AsyncIterator[None]:
    """Collect the test's closed XMPP sessions while their event loop is still open."""
    yield
    gc.collect()
    await asyncio.sleep(0)


def ok(result: Result) -> Result:
    assert result.code == 0, result
    assert result.err == b"", result
    return result


def failed(result: Result, code: int, *, mentions: str | None = None) -> str:
    """Check a failure: the exit code and exactly one line of explanation."""
    assert result.code == code, result
    text = result.err.decode(errors="replace")
    assert "Traceback" not in text, text
    assert text.endswith("\n"), text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("kv: "), text
    assert len(text.strip()) > len("kv:"), text
    if mentions is not None:
        assert mentions.lower() in text.lower(), text
    return text


# --- put ------------------------------------------------------------------------


async def test_put_from_argument_prints_the_revision(cli: Runner, kv: Client,
                                                     prefix: str) -> None:
    result = ok(await cli("put", f"{prefix}/a", "hello world"))
    item = await kv.get(f"{prefix}/a")
    assert item.value == b"hello world"
    assert result.lines == [str(item.mod_rev)]


async def test_put_from_stdin(cli: Runner, kv: Client, prefix: str) -> None:
    ok(await cli("put", f"{prefix}/implicit", stdin=b"from stdin\n"))
    assert (await kv.get(f"{prefix}/implicit")).value == b"from stdin\n"
    data = os.urandom(5000) + b"\xff\x00"
    ok(await cli("put", f"{prefix}/dash", "-", stdin=data))
    assert (await kv.get(f"{prefix}/dash")).value == data
    ok(await cli("put", f"{prefix}/empty", stdin=b""))
    item = await kv.get(f"{prefix}/empty")
    assert (item.value, item.version) == (b"", 1)


async def test_put_value_at_the_limit_from_stdin(cli: Runner, kv: Client, prefix: str) -> None:
    data = os.urandom(NODE_VALUE_LIMIT)
    ok(await cli("put", f"{prefix}/big", stdin=data))
    assert (await kv.get(f"{prefix}/big")).value == data
    raw = ok(await cli("get", "--raw", f"{prefix}/big"))
    assert raw.out == data


async def test_put_non_utf8_argument_is_stored_as_its_bytes(cli: Runner, kv: Client,
                                                            prefix: str) -> None:
    ok(await cli("put", f"{prefix}/bytes", b"caf\xe9\xff"))
    assert (await kv.get(f"{prefix}/bytes")).value == b"caf\xe9\xff"


async def test_put_if_version(cli: Runner, kv: Client, prefix: str) -> None:
    key = f"{prefix}/cas"
    ok(await cli("put", "--if-version", "0", key, "v1"))
    failed(await cli("put", "--if-version", "0", key, "again"), 1)
    ok(await cli("put", "--if-version", "1", key, "v2"))
    failed(await cli("put", "--if-version", "1", key, "stale"), 1)
    item = await kv.get(key)
    assert (item.value, item.version) == (b"v2", 2)
    ok(await cli("put", "--if-mod-rev", str(item.mod_rev), key, "v3"))
    failed(await cli("put", "--if-mod-rev", str(item.mod_rev), key, "v4"), 1)
    assert (await kv.get(key)).value == b"v3"
    failed(await cli("put", "--if-version", "4", f"{prefix}/absent", "x"), 1)
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/absent")


# --- get ------------------------------------------------------------------------


async def test_get_plain_adds_a_newline(cli: Runner, kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/a", b"hello")
    assert ok(await cli("get", f"{prefix}/a")).out == b"hello\n"
    await kv.put(f"{prefix}/empty", b"")
    assert ok(await cli("get", f"{prefix}/empty")).out == b"\n"


async def test_get_raw_writes_exact_bytes(cli: Runner, kv: Client, prefix: str) -> None:
    for value in (b"no newline", b"\xff\xfe\x00binary\n\r", b"", bytes(range(256))):
        await kv.put(f"{prefix}/raw", value)
        assert ok(await cli("get", "--raw", f"{prefix}/raw")).out == value


async def test_get_json_fields(cli: Runner, kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/text", "h\u00e9llo")
    written = await kv.put(f"{prefix}/text", "h\u00e9llo \u2713")
    binary = b"\xff\xfe\x80"
    await kv.put(f"{prefix}/bin", binary)

    line = json.loads(ok(await cli("get", "--json", f"{prefix}/text")).out)
    assert line == {
        "key": f"{prefix}/text",
        "value": "h\u00e9llo \u2713",
        "value_base64": base64.b64encode("h\u00e9llo \u2713".encode()).decode(),
        "version": 2,
        "create_rev": written.create_rev,
        "mod_rev": written.mod_rev,
    }
    result = ok(await cli("get", "--json", f"{prefix}/bin"))
    assert len(result.lines) == 1
    line = json.loads(result.out)
    assert line["value"] is None
    assert base64.b64decode(line["value_base64"]) == binary
    assert line["version"] == 1
    assert line["create_rev"] == line["mod_rev"] == (await kv.get(f"{prefix}/bin")).mod_rev


async def test_get_prefix(cli: Runner, kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/d/b", b"2")
    await kv.put(f"{prefix}/d", b"0")
    await kv.put(f"{prefix}/d/a/x", b"1")
    await kv.put(f"{prefix}/d-sibling", b"no")
    order = [f"{prefix}/d", f"{prefix}/d/a/x", f"{prefix}/d/b"]

    plain = ok(await cli("get", "--prefix", f"{prefix}/d"))
    assert plain.lines == [order[0], "0", order[1], "1", order[2], "2"]
    keys_only = ok(await cli("get", "--prefix", "--keys-only", f"{prefix}/d"))
    assert keys_only.lines == order
    limited = ok(await cli("get", "--prefix", "--limit", "2", "--keys-only", f"{prefix}/d"))
    assert limited.lines == order[:2]
    as_json = ok(await cli("get", "--prefix", "--json", f"{prefix}/d"))
    lines = [json.loads(line) for line in as_json.lines]
    assert [line["key"] for line in lines] == order
    assert [line["value"] for line in lines] == ["0", "1", "2"]
    failed(await cli("get", "--prefix", f"{prefix}/nothing"), 1)


async def test_get_prefix_across_shards(cli: Runner, kv: Client, prefix: str) -> None:
    sharded = f"/sharded/cli-{uuid.uuid4().hex[:8]}"
    await kv.put(f"{sharded}/x", b"far")
    await kv.put(f"{prefix}/x", b"near")
    assert ok(await cli("get", "--prefix", sharded)).lines == [f"{sharded}/x", "far"]
    assert ok(await cli("get", f"{sharded}/x")).out == b"far\n"
    everything = ok(await cli("get", "--prefix", "--keys-only", "/"))
    assert f"{sharded}/x" in everything.lines
    assert f"{prefix}/x" in everything.lines


# --- ls and rm --------------------------------------------------------------------


async def test_ls(cli: Runner, kv: Client, prefix: str) -> None:
    for name in ("b", "a/deep/er", "c", "a"):
        await kv.put(f"{prefix}/{name}", b"x")
    assert ok(await cli("ls", prefix)).lines == ["a", "b", "c"]
    assert [json.loads(line) for line in ok(await cli("ls", "--json", prefix)).lines] == [
        {"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert ok(await cli("ls", "--limit", "2", prefix)).lines == ["a", "b"]
    assert ok(await cli("ls", f"{prefix}/a")).lines == ["deep"]
    assert ok(await cli("ls", f"{prefix}/missing")).lines == []
    root = ok(await cli("ls")).lines
    assert "t" in root
    assert "sharded" in root


async def test_rm(cli: Runner, kv: Client, prefix: str) -> None:
    await kv.put(f"{prefix}/k", b"1")
    assert ok(await cli("rm", f"{prefix}/k")).lines == ["1"]
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/k")
    failed(await cli("rm", f"{prefix}/k"), 1)

    await kv.put(f"{prefix}/v", b"1")
    failed(await cli("rm", "--if-version", "2", f"{prefix}/v"), 1)
    assert (await kv.get(f"{prefix}/v")).value == b"1"
    ok(await cli("rm", "--if-version", "1", f"{prefix}/v"))


async def test_rm_prefix_is_segment_wise(cli: Runner, kv: Client, prefix: str) -> None:
    for name in ("x/a", "x/a/b", "x/a/b/c", "x/ab", "x/a-b"):
        await kv.put(f"{prefix}/{name}", b"1")
    assert ok(await cli("rm", "--prefix", f"{prefix}/x/a")).lines == ["3"]
    left = await kv.get_prefix(prefix)
    assert [item.key for item in left.items] == [f"{prefix}/x/a-b", f"{prefix}/x/ab"]


async def test_rm_prefix_of_nothing_exits_1_with_a_message(cli: Runner, prefix: str) -> None:
    """Like ``get --prefix`` of an empty subtree: exit 1, and say why on stderr."""
    nothing = await cli("rm", "--prefix", f"{prefix}/nothing")
    assert nothing.lines == ["0"]
    failed(nothing, 1)


# --- status ---------------------------------------------------------------------


async def test_status(cli: Runner, cluster: DevCluster) -> None:
    node1, node2 = cluster.nodes["node1"].jid, cluster.nodes["node2"].jid
    lines = ok(await cli("status")).lines
    assert len(lines) == 2
    fields = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert set(fields) == {node1, node2}
    assert fields[node1][1] == "online"
    assert re.fullmatch(r"shards=/@\d+", fields[node1][2])
    assert re.fullmatch(r"shards=/sharded@\d+", fields[node2][2])
    assert re.fullmatch(r"keys=\d+", fields[node2][3])


async def test_status_json(cli: Runner, kv: Client, cluster: DevCluster) -> None:
    sharded = f"/sharded/cli-{uuid.uuid4().hex[:8]}"
    written = await kv.put(f"{sharded}/s", b"1")
    lines = [json.loads(line) for line in ok(await cli("status", "--json")).lines]
    by_jid = {line["jid"]: line for line in lines}
    assert set(by_jid) == {cluster.nodes["node1"].jid, cluster.nodes["node2"].jid}
    node2 = by_jid[cluster.nodes["node2"].jid]
    assert node2["online"] is True
    assert [shard["prefix"] for shard in node2["shards"]] == ["/sharded"]
    assert node2["shards"][0]["rev"] == written.rev
    assert node2["revision"] == written.rev
    assert node2["shards"][0]["keys"] >= 1
    assert set(node2["shards"][0]) == {"prefix", "rev", "compact_rev", "keys"}
    node1 = by_jid[cluster.nodes["node1"].jid]
    assert node1["online"] is True
    assert [shard["prefix"] for shard in node1["shards"]] == ["/"]
    assert {"watchers", "uptime"} <= set(node1)


# --- watch ----------------------------------------------------------------------


async def watcher_count(kv: Client, node_jid: str) -> int:
    for node in await kv.status():
        if node.jid == node_jid:
            return node.watchers
    raise AssertionError(f"{node_jid} missing from status")


async def start_watch(cluster: DevCluster, kv: Client, node: str,
                      *args: str) -> asyncio.subprocess.Process:
    """Start ``kv watch`` and wait until the node has registered its watch."""
    jid = cluster.nodes[node].jid
    before = await watcher_count(kv, jid)
    env = {**base_env(), "KV_CONFIG": str(cluster.client_config)}
    process = await asyncio.create_subprocess_exec(
        str(KV), "watch", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    for _ in range(200):
        if await watcher_count(kv, jid) > before:
            return process
        if process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    process.kill()
    _, err = await process.communicate()
    pytest.fail(f"the watch never registered; stderr: {err!r}")


async def finish(process: asyncio.subprocess.Process) -> Result:
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(f"kv watch did not exit; got {out!r} {err!r}")
    assert process.returncode is not None
    return Result(process.returncode, out, err)


async def test_watch_count_json(cli: Runner, kv: Client, cluster: DevCluster,
                                prefix: str) -> None:
    key = f"{prefix}/w"
    process = await start_watch(cluster, kv, "node1", key, "--count", "3", "--json")
    first = await kv.put(key, b"one")
    second = await kv.put(key, b"\xff")
    removed = await kv.delete(key)
    await kv.put(key, b"after the count")  # must not be printed
    result = ok(await finish(process))
    events = [json.loads(line) for line in result.lines]
    assert len(events) == 3
    assert [event["type"] for event in events] == ["put", "put", "delete"]
    assert all(event["key"] == key and event["shard"] == "/" for event in events)
    assert events[0]["value"] == "one"
    assert events[0]["value_base64"] == base64.b64encode(b"one").decode()
    assert (events[0]["version"], events[0]["create_rev"], events[0]["mod_rev"]) == (
        1, first.rev, first.rev)
    assert events[1]["value"] is None
    assert base64.b64decode(events[1]["value_base64"]) == b"\xff"
    assert (events[1]["version"], events[1]["mod_rev"]) == (2, second.rev)
    assert events[2]["version"] == 0
    assert events[2]["mod_rev"] == removed.revisions["/"]


async def test_watch_prefix_in_second_shard(kv: Client, cluster: DevCluster) -> None:
    sharded = f"/sharded/cli-{uuid.uuid4().hex[:8]}"
    process = await start_watch(cluster, kv, "node2", sharded, "--prefix", "--count", "2",
                                "--json")
    await kv.put(f"{sharded}-not-below/x", b"no")
    await kv.put(f"{sharded}/a", b"1")
    await kv.put(f"{sharded}/b/c", b"2")
    result = ok(await finish(process))
    events = [json.loads(line) for line in result.lines]
    assert [(e["type"], e["key"], e["value"], e["shard"]) for e in events] == [
        ("put", f"{sharded}/a", "1", "/sharded"), ("put", f"{sharded}/b/c", "2", "/sharded")]


async def test_watch_since_replays_history(cli: Runner, kv: Client, prefix: str) -> None:
    first = await kv.put(f"{prefix}/h", b"1")
    await kv.put(f"{prefix}/h", b"2")
    result = ok(await cli("watch", f"{prefix}/h", "--since", str(first.rev), "--count", "2"))
    assert result.lines == [f"put {prefix}/h", "1", f"put {prefix}/h", "2"]


# --- exit codes -----------------------------------------------------------------


async def test_missing_key_exits_1(cli: Runner, prefix: str) -> None:
    failed(await cli("get", f"{prefix}/missing"), 1, mentions="not found")
    failed(await cli("get", "--raw", f"{prefix}/missing"), 1)
    failed(await cli("get", "--json", f"{prefix}/missing"), 1)


@pytest.mark.parametrize("args", [
    ("get", "no-slash"),
    ("get", "/a//b"),
    ("get", "/a/../b"),
    ("get", "/trailing/"),
    ("get", "/"),
    ("put", "/", "x"),
    ("put", "relative", "x"),
    ("rm", "/a/./b"),
    ("ls", "nope"),
    ("watch", "bad key"),
    ("get", "--prefix", "x/y"),
], ids=lambda args: "-".join(args))
async def test_invalid_key_exits_2(cli: Runner, args: tuple[str, ...]) -> None:
    failed(await cli(*args), 2)


async def test_oversize_value_exits_2(cli: Runner, kv: Client, prefix: str) -> None:
    failed(await cli("put", f"{prefix}/big", stdin=b"x" * (NODE_VALUE_LIMIT + 1)), 2,
           mentions=str(NODE_VALUE_LIMIT))
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/big")


@pytest.mark.parametrize("args", [
    (),
    ("frobnicate",),
    ("frobnicate", "/a"),
    ("get",),
    ("get", "/a", "--bogus"),
    ("--bogus", "status"),
    ("put", "/a", "b", "c"),
    ("put", "--if-version", "abc", "/a", "x"),
    ("put", "--if-version", "-1", "/a", "x"),
    ("get", "--prefix", "--limit", "0", "/a"),
    ("watch", "/a", "--count", "many"),
    ("watch", "/a", "--since", "0"),
    ("--timeout", "0", "get", "/a"),
    ("--timeout", "soon", "get", "/a"),
], ids=lambda args: "-".join(args) or "nothing")
async def test_usage_errors_exit_2(cli: Runner, args: tuple[str, ...]) -> None:
    failed(await cli(*args), 2)


async def test_missing_config_exits_2(tmp_path: Path) -> None:
    failed(await run_kv("get", "/a", env=base_env()), 2, mentions="KV_CONFIG")
    env = {**base_env(), "KV_CONFIG": str(tmp_path / "nowhere.toml")}
    failed(await run_kv("get", "/a", env=env), 2, mentions="not found")
    failed(await run_kv("--config", str(tmp_path / "nowhere.toml"), "status", env=base_env()),
           2)


async def test_malformed_config_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[connection\nserver = ")
    failed(await run_kv("--config", str(broken), "get", "/a", env=base_env()), 2)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    failed(await run_kv("--config", str(empty), "get", "/a", env=base_env()), 2)
    no_password = tmp_path / "nopass.toml"
    no_password.write_text('[connection]\nserver = "127.0.0.1:5222"\njid = "a@localhost"\n')
    failed(await run_kv("--config", str(no_password), "get", "/a", env=base_env()), 2)


def write_config(path: Path, *, port: int, jid: str, password: str, nodes: list[str],
                 timeout: float = 3.0) -> Path:
    path.write_text(
        "[connection]\n"
        f'server = "127.0.0.1:{port}"\n'
        f'jid = "{jid}"\n'
        f'password = "{password}"\n'
        "plaintext = true\n"
        f"timeout = {timeout}\n\n"
        "[store]\n"
        f"nodes = {json.dumps(nodes)}\n")
    return path


async def test_unreachable_server_exits_3(tmp_path: Path, cluster: DevCluster) -> None:
    settings = cluster.settings()
    config = write_config(tmp_path / "dead.toml", port=free_port(), jid=settings.jid,
                          password=settings.password, nodes=settings.nodes)
    env = {**base_env(), "KV_CONFIG": str(config)}
    for args in (("get", "/a"), ("put", "/a", "x"), ("status",), ("ls",),
                 ("watch", "/a", "--count", "1")):
        failed(await run_kv(*args, env=env, timeout=20), 3)


async def test_wrong_password_exits_3(tmp_path: Path, cluster: DevCluster,
                                      kv: Client, prefix: str) -> None:
    settings = cluster.settings()
    config = write_config(tmp_path / "wrong.toml", port=settings.port, jid=settings.jid,
                          password=settings.password + "-wrong", nodes=settings.nodes)
    env = {**base_env(), "KV_CONFIG": str(config)}
    failed(await run_kv("get", "/a", env=env), 3)
    failed(await run_kv("put", f"{prefix}/x", "y", env=env), 3)
    with pytest.raises(KeyNotFound):
        await kv.get(f"{prefix}/x")


async def test_no_storage_node_online_exits_3(tmp_path: Path, cluster: DevCluster) -> None:
    settings = cluster.settings()
    config = write_config(tmp_path / "ghost.toml", port=settings.port, jid=settings.jid,
                          password=settings.password, nodes=["ghost@localhost"], timeout=1.0)
    env = {**base_env(), "KV_CONFIG": str(config)}
    failed(await run_kv("get", "/a", env=env), 3)
    failed(await run_kv("status", env=env), 3)
