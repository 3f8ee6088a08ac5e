"""Access control through a real cluster: unknown JIDs, rules, groups, filtering."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvstore import acl
from kvstore.client import Client
from kvstore.devcluster import DevCluster
from protocol.errors import Forbidden, KeyNotFound

KV = str(Path(sys.executable).with_name("kv"))


@pytest.fixture
def secured(make_cluster: Callable[..., DevCluster]) -> DevCluster:
    """``client`` is admin; accounts named user-* are known; anybody else is a stranger."""
    return make_cluster(node_settings={"acl.groups": {"users": ["user-*@localhost"]}})


async def _eventually(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Rules reach the nodes through a watch: give them a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                await result
            return
        except (AssertionError, Forbidden, KeyNotFound, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_stranger_is_refused_everything_and_it_is_logged(secured: DevCluster) -> None:
    async with Client(secured.settings()) as admin:
        await admin.put("/open/a", b"1")
    async with Client(secured.settings("stranger")) as stranger:
        with pytest.raises(Forbidden):
            await stranger.get("/open/a")
        with pytest.raises(Forbidden):
            await stranger.put("/open/b", b"2")
        with pytest.raises(Forbidden):
            await stranger.watch("/open", prefix=True).start()
        with pytest.raises(Forbidden):
            await stranger.list("/")
    log = (secured.nodes["node1"].folder / "node.log").read_text()
    assert "refused" in log and "stranger@localhost" in log


async def test_a_known_user_reads_but_may_not_write_by_default(secured: DevCluster) -> None:
    async with Client(secured.settings()) as admin, \
            Client(secured.settings("user-ann")) as ann:
        await admin.put("/data/x", b"1")
        assert (await ann.get("/data/x")).value == b"1"
        with pytest.raises(Forbidden):
            await ann.put("/data/x", b"2")
        with pytest.raises(Forbidden):
            await ann.delete("/data/x")
        assert (await admin.get("/data/x")).value == b"1"


async def test_rules_and_groups_apply_without_restart(secured: DevCluster) -> None:
    async with Client(secured.settings()) as admin, \
            Client(secured.settings("user-bob")) as bob:
        await admin.put(acl.rule_key("/team", "group:ops"), json.dumps({"allow": ["read",
                                                                                  "write"]}))
        with pytest.raises(Forbidden):
            await bob.put("/team/plan", b"x")  # not in ops yet
        await admin.put(acl.group_key("ops", "user-bob@localhost"), b"")
        await _eventually(lambda: bob.put("/team/plan", b"x"))
        with pytest.raises(Forbidden):
            await bob.put("/elsewhere", b"x")
        await admin.delete(acl.group_key("ops", "user-bob@localhost"))

        async def refused() -> None:
            with pytest.raises(Forbidden):
                await bob.put("/team/plan", b"y")

        await _eventually(refused)


async def test_the_most_specific_rule_wins_and_nothing_leaks(secured: DevCluster) -> None:
    async with Client(secured.settings()) as admin, \
            Client(secured.settings("user-cat")) as cat:
        for key in ("/team/plan", "/team/secret/salary", "/team/secret/bonus", "/team/z"):
            await admin.put(key, b"v")
        await admin.put(acl.rule_key("/team", "user-cat@localhost"),
                        json.dumps({"allow": ["read", "watch", "write"]}))
        await admin.put(acl.rule_key("/team/secret", "user-cat@localhost"),
                        json.dumps({"allow": []}))

        async def ruled() -> None:
            with pytest.raises(Forbidden):
                await cat.get("/team/secret/salary")

        await _eventually(ruled)
        await cat.put("/team/plan", b"mine")
        got = [item.key for item in (await cat.get_prefix("/team")).items]
        assert got == ["/team/plan", "/team/z"]
        assert (await cat.list("/team")).names == ["plan", "z"]
        with pytest.raises(Forbidden):
            await cat.delete("/team", prefix=True)  # it would take the secret subtree along
        stream = cat.watch("/team", prefix=True)
        await stream.start()
        await admin.put("/team/secret/salary", b"more")
        await admin.put("/team/z", b"seen")
        event = await stream.next(timeout=5)
        await stream.close()
        assert event.key == "/team/z"


async def test_only_admins_change_the_rules(secured: DevCluster) -> None:
    async with Client(secured.settings("user-dan")) as dan:
        with pytest.raises(Forbidden):
            await dan.put(acl.rule_key("/", "user-dan@localhost"),
                          json.dumps({"allow": ["write"]}))
        with pytest.raises(Forbidden):
            await dan.put(acl.group_key("admins", "user-dan@localhost"), b"")


async def test_an_agent_writes_its_own_registry_entries_and_nothing_else(
        secured: DevCluster) -> None:
    async with Client(secured.settings("user-eve")) as eve:
        mine = f"/sys/agents/{eve.jid.replace('/', '%2F')}"
        await eve.put(mine, b"{}", ephemeral=True)
        await eve.put(f"/sys/resources/rack/1/@/{eve.jid.replace('/', '%2F')}", b"",
                      ephemeral=True)
        with pytest.raises(Forbidden):
            await eve.put("/sys/agents/someone-else@localhost%2Fagent", b"{}")
        with pytest.raises(Forbidden):
            await eve.put("/sys/other", b"x")


def test_kv_acl_commands_show_and_change_rules(secured: DevCluster) -> None:
    env = {**os.environ, "KV_CONFIG": str(secured.client_config)}

    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([KV, *args], capture_output=True, text=True, env=env, timeout=30)

    assert kv("acl", "grant", "/team", "group:ops", "read,write").returncode == 0
    assert kv("acl", "join", "ops", "user-fay@localhost").returncode == 0
    shown = kv("acl", "show").stdout.splitlines()
    assert "/team\tgroup:ops\tread,write" in shown
    assert "group:ops\tuser-fay@localhost" in shown
    bad = kv("acl", "grant", "/team", "group:ops", "fly")
    assert bad.returncode == 2 and "unknown permissions" in bad.stderr
    assert kv("acl", "revoke", "/team", "group:ops").returncode == 0
    assert kv("acl", "leave", "ops", "user-fay@localhost").returncode == 0
    assert kv("acl", "show", "--json").stdout.strip() == ""
