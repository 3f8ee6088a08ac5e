"""A development cluster: a private Prosody plus one storage node per shard.

Used by ``kvstore dev``, ``make demo``, the test suite and the benchmarks,
so all of them run the same real processes. Everything lives under one
folder: the server's config, data and log, and for each node its config,
its LMDB data and its log. Node data survives a restart of the cluster.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.config import ConnectionSettings
from kvstore.testing.process import wait_for_line
from kvstore.testing.prosody import Prosody
from protocol import keys
from protocol.errors import Unavailable


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_toml(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{name} = {_toml_value(value)}" for name, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


@dataclass
class NodeProcess:
    name: str
    shards: list[str]
    config: Path
    folder: Path
    jid: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


@dataclass
class DevCluster:
    """Prosody and storage nodes under ``folder``; ``start()`` then ``stop()``."""

    folder: Path
    shards: list[str] = field(default_factory=lambda: ["/"])
    port: int | None = None
    node_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra TOML tables for every node config, e.g. ``{"limits": {...}}``."""
    log_level: str = "info"
    allow_registration: bool = True
    """Let local agents create their own accounts (XEP-0077, loopback only)."""
    tls: bool = False
    """Require TLS, with a self-signed certificate the cluster makes; clients verify it."""
    acl: bool = True
    """Enforce access control: ``client`` is the admin, every other local account
    may read and watch everything and write its own registry entries."""

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        for prefix in self.shards:
            keys.validate(prefix, allow_root=True)
        if len(set(self.shards)) != len(self.shards):
            raise ValueError("each shard prefix may appear once")
        self.prosody = Prosody(self.folder / "prosody", port=self.port,
                               allow_registration=self.allow_registration, tls=self.tls)
        self.nodes: dict[str, NodeProcess] = {}
        self.client_config = self.folder / "client.toml"
        self._client_password = ""

    # --- accounts -------------------------------------------------------

    def add_account(self, user: str, password: str | None = None) -> tuple[str, str]:
        password = password or secrets.token_urlsafe(12)
        return self.prosody.register(user, password), password

    def settings(self, user: str = "client", *, nodes: list[str] | None = None,
                 timeout: float = 5.0) -> ConnectionSettings:
        """Connection settings for a fresh account (or the shared client one)."""
        if user == "client":
            jid, password = f"client@{self.prosody.domain}", self._client_password
        else:
            jid, password = self.add_account(user)
        return ConnectionSettings(
            jid=jid, password=password, host="127.0.0.1", port=self.prosody.port,
            plaintext=not self.tls, timeout=timeout,
            ca_file=str(self.prosody.certificate) if self.tls else None,
            nodes=nodes if nodes is not None else [n.jid.split("/")[0]
                                                   for n in self.nodes.values()],
        )

    # --- life cycle -----------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prosody.start()
        try:
            _, self._client_password = self.add_account("client")
            for index, prefix in enumerate(self.shards, start=1):
                self._configure_node(f"node{index}", [prefix])
            client = self.settings().to_dict()
            client["agents"] = {"register": self.allow_registration}
            write_toml(self.client_config, client)
            for node in self.nodes.values():
                self._spawn(node)
            for node in self.nodes.values():
                self._wait_ready(node, timeout)
        except BaseException:
            self.stop()
            raise

    def _configure_node(self, name: str, shards: list[str]) -> NodeProcess:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        jid, password = self.add_account(name)
        config = folder / "node.toml"
        tables: dict[str, dict[str, Any]] = {
            "connection": {
                "server": self.prosody.address,
                "jid": f"{jid}/kvstore",
                "password": password,
                "plaintext": not self.tls,
                **({"ca_file": str(self.prosody.certificate)} if self.tls else {}),
            },
            "node": {
                "name": name,
                "data_dir": "data",
                "shards": shards,
                "cluster_shards": list(self.shards),
            },
            "store": {
                "nodes": [f"node{i}@{self.prosody.domain}" for i in range(1, len(self.shards) + 1)],
            },
        }
        if self.acl:
            tables["acl"] = {"enabled": True, "admins": [f"client@{self.prosody.domain}"]}
            tables["acl.groups"] = {"users": [f"*@{self.prosody.domain}"]}
        for table, values in self.node_settings.items():
            tables.setdefault(table, {}).update(values)
        write_toml(config, tables)
        node = NodeProcess(name, shards, config, folder, f"{jid}/kvstore")
        self.nodes[name] = node
        return node

    def _spawn(self, node: NodeProcess) -> None:
        log = open(node.folder / "node.log", "ab")
        node.process = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--config", str(node.config),
             "--log-level", self.log_level],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        log.close()

    def _wait_ready(self, node: NodeProcess, timeout: float) -> None:
        assert node.process is not None
        line = wait_for_line(node.process, b"ready:", timeout)
        if line.startswith(b"ready:"):
            return
        raise Unavailable(f"storage node {node.name} did not start (last output {line!r}); "
                          f"see {node.folder / 'node.log'}")

    def stop(self, timeout: float = 5.0) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            if node.process is None:
                continue
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            if node.process.stdout is not None:
                node.process.stdout.close()
            node.process = None
        self.prosody.stop()

    # --- faults, for tests ------------------------------------------------

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[name]
        assert node.process is not None
        os.kill(node.process.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            node.process.wait(10)
            if node.process.stdout is not None:
                node.process.stdout.close()
            node.process = None

    def start_node(self, name: str, timeout: float = 30.0) -> None:
        node = self.nodes[name]
        self._spawn(node)
        self._wait_ready(node, timeout)

    def restart_node(self, name: str) -> None:
        self.kill_node(name, signal.SIGTERM)
        self.start_node(name)

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
