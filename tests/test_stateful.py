"""The store against a model, driven by hypothesis through the async client.

The model is a dict key -> (value, version, create_rev, mod_rev) plus one
revision counter per shard: keys under ``/sharded`` belong to shard
``/sharded`` (node2), every other key to ``/`` (node1). Each run uses its own
key prefixes in both shards and a handful of keys, so puts, compares and
deletes keep running into each other. Tests run one at a time, so nothing
but the machine writes to the session cluster while it runs and every
revision can be predicted exactly.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvstore.client import Client
from kvstore.config import ConnectionSettings
from kvstore.devcluster import DevCluster
from protocol import keys
from protocol.errors import KeyNotFound, VersionMismatch

T = TypeVar("T")

# Relative names: a tree where segment-wise and string prefixes disagree.
NAMES = ["a", "a/b", "a/b/c", "ab", "a-b", "b", "b/a"]
PREFIX_NAMES = ["", "a", "a/b", "b", "ab"]
"""Subtrees to read, list and delete ("" is the run's own root)."""
SIDES = ["local", "sharded"]

values = st.binary(max_size=40) | st.text(max_size=10).map(str.encode)
versions = st.none() | st.integers(min_value=0, max_value=3)

Record = tuple[bytes, int, int, int]
"""value, version, create_rev, mod_rev"""


def shard_of(key: str) -> str:
    return "/sharded" if keys.is_prefix("/sharded", key) else "/"


class StoreMachine(RuleBasedStateMachine):
    connection: ConnectionSettings
    """Set by the test before the machine runs."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client: Client | None = None
        run_id = uuid.uuid4().hex[:10]
        self.roots = {"local": f"/t/stateful-{run_id}", "sharded": f"/sharded/stateful-{run_id}"}
        self.model: dict[str, Record] = {}
        self.revs: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        """Highest revision of each shard observed so far."""

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 30))

    async def _connect(self) -> Client:
        client = Client(self.connection)
        await client.connect()
        return client

    @initialize()
    def connect(self) -> None:
        self.client = self.run(self._connect())
        self.revs = self.current_revisions()
        assert set(self.revs) == {"/", "/sharded"}
        self.seen = dict(self.revs)

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self.run(self.client.close())
                self.client = None
                gc.collect()
                self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self.loop.close()

    # --- helpers ------------------------------------------------------------

    @property
    def kv(self) -> Client:
        assert self.client is not None
        return self.client

    def key(self, side: str, name: str) -> str:
        return keys.join(self.roots[side], *name.split("/")) if name else self.roots[side]

    def current_revisions(self) -> dict[str, int]:
        nodes = self.run(self.kv.status())
        assert all(node.online for node in nodes), nodes
        return {shard.prefix: shard.rev for node in nodes for shard in node.shards}

    def observe(self, shard: str, rev: int) -> None:
        assert rev >= self.seen.get(shard, 0), (shard, rev, self.seen)
        self.seen[shard] = rev

    def subtree(self, top: str) -> list[str]:
        return sorted((k for k in self.model if keys.is_prefix(top, k)), key=keys.tree_order)

    # --- rules ----------------------------------------------------------------

    @rule(side=st.sampled_from(SIDES), name=st.sampled_from(NAMES), value=values,
          if_version=versions)
    def put(self, side: str, name: str, value: bytes, if_version: int | None) -> None:
        key = self.key(side, name)
        shard = shard_of(key)
        current = self.model.get(key)
        version = current[1] if current else 0
        if if_version is not None and if_version != version:
            with pytest.raises(VersionMismatch) as caught:
                self.run(self.kv.put(key, value, if_version=if_version))
            assert caught.value.current_version == version
            assert caught.value.current_mod_rev == (current[3] if current else 0)
            return
        result = self.run(self.kv.put(key, value, if_version=if_version))
        self.revs[shard] += 1
        rev = self.revs[shard]
        record = (value, version + 1, current[2] if current else rev, rev)
        self.model[key] = record
        assert result.shard == shard
        assert (result.rev, result.version, result.create_rev, result.mod_rev) == (
            rev, *record[1:])
        self.observe(shard, result.rev)

    @rule(side=st.sampled_from(SIDES), name=st.sampled_from(NAMES))
    def get(self, side: str, name: str) -> None:
        key = self.key(side, name)
        expected = self.model.get(key)
        if expected is None:
            with pytest.raises(KeyNotFound):
                self.run(self.kv.get(key))
            return
        item = self.run(self.kv.get(key))
        assert item.key == key
        assert (item.value, item.version, item.create_rev, item.mod_rev) == expected

    @rule(side=st.sampled_from(SIDES), name=st.sampled_from(NAMES), if_version=versions)
    def delete(self, side: str, name: str, if_version: int | None) -> None:
        key = self.key(side, name)
        shard = shard_of(key)
        current = self.model.get(key)
        if current is None:
            with pytest.raises(KeyNotFound):
                self.run(self.kv.delete(key, if_version=if_version))
            return
        if if_version is not None and if_version != current[1]:
            with pytest.raises(VersionMismatch) as caught:
                self.run(self.kv.delete(key, if_version=if_version))
            assert caught.value.current_version == current[1]
            return
        result = self.run(self.kv.delete(key, if_version=if_version))
        self.revs[shard] += 1
        del self.model[key]
        assert result.deleted == 1
        assert result.revisions == {shard: self.revs[shard]}
        self.observe(shard, self.revs[shard])

    @rule(side=st.sampled_from(SIDES), name=st.sampled_from(PREFIX_NAMES))
    def delete_prefix(self, side: str, name: str) -> None:
        top = self.key(side, name)
        shard = shard_of(top)
        doomed = self.subtree(top)
        result = self.run(self.kv.delete(top, prefix=True))
        assert result.deleted == len(doomed)
        if doomed:
            self.revs[shard] += 1
            assert result.revisions == {shard: self.revs[shard]}
            self.observe(shard, self.revs[shard])
        else:
            assert result.revisions == {}
        for key in doomed:
            del self.model[key]

    @rule(side=st.sampled_from(SIDES), name=st.sampled_from(PREFIX_NAMES),
          limit=st.none() | st.integers(min_value=1, max_value=4),
          keys_only=st.booleans())
    def get_prefix(self, side: str, name: str, limit: int | None, keys_only: bool) -> None:
        top = self.key(side, name)
        shard = shard_of(top)
        expected = self.subtree(top)
        result = self.run(self.kv.get_prefix(top, limit=limit, keys_only=keys_only))
        wanted = expected if limit is None else expected[:limit]
        assert [item.key for item in result.items] == wanted
        for item in result.items:
            value, version, create_rev, mod_rev = self.model[item.key]
            assert item.value == (b"" if keys_only else value)
            assert (item.version, item.create_rev, item.mod_rev) == (
                version, create_rev, mod_rev)
        assert result.more == (limit is not None and len(expected) > limit)
        assert result.revisions == {shard: self.revs[shard]}

    @rule(side=st.sampled_from(SIDES), name=st.sampled_from(PREFIX_NAMES),
          limit=st.none() | st.integers(min_value=1, max_value=3))
    def list_children(self, side: str, name: str, limit: int | None) -> None:
        top = self.key(side, name)
        children = sorted({keys.child_name(top, k) for k in self.model
                           if keys.is_strict_prefix(top, k)}, key=str.encode)
        result = self.run(self.kv.list(top, limit=limit))
        assert result.names == (children if limit is None else children[:limit])
        assert result.more == (limit is not None and len(children) > limit)
        assert result.revisions == {shard_of(top): self.revs[shard_of(top)]}

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def put_if_mod_rev(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        value, version, create_rev, mod_rev = self.model[key]
        stale = data.draw(st.booleans())
        if stale:
            with pytest.raises(VersionMismatch) as caught:
                self.run(self.kv.put(key, b"stale", if_mod_rev=mod_rev - 1))
            assert caught.value.current_mod_rev == mod_rev
            return
        shard = shard_of(key)
        result = self.run(self.kv.put(key, value + b"!", if_mod_rev=mod_rev))
        self.revs[shard] += 1
        self.model[key] = (value + b"!", version + 1, create_rev, self.revs[shard])
        assert (result.version, result.create_rev, result.mod_rev) == self.model[key][1:]

    # --- invariants -----------------------------------------------------------

    @invariant()
    def revisions_match_the_model_and_only_grow(self) -> None:
        if self.client is None:
            return
        now = self.current_revisions()
        for shard, rev in now.items():
            self.observe(shard, rev)
        assert now == self.revs


def test_store_behaves_like_the_model(cluster: DevCluster) -> None:
    StoreMachine.connection = cluster.settings()
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          derandomize=False, database=None),
    )
