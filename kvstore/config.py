"""Configuration files (TOML) for clients, storage nodes and agents.

A client config::

    [connection]
    server = "127.0.0.1:5222"      # where the XMPP server listens
    jid = "client@localhost"
    password = "secret"
    plaintext = true                # loopback only; refused for other addresses
    timeout = 5.0                   # seconds, per operation

    [store]
    nodes = ["node1@localhost", "node2@localhost"]

A storage node config adds ``[node]``, ``[limits]`` and ``[storage]`` (see
:class:`NodeConfig`).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.acl import AclSettings
from protocol import keys
from protocol.errors import BadRequest

CONFIG_ENV = "KV_CONFIG"


class ConfigError(BadRequest):
    """A configuration file is missing, unreadable or wrong."""

    condition = "bad-config"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ConnectionSettings:
    """How to reach the XMPP server and who to be there."""

    jid: str
    password: str
    host: str = "127.0.0.1"
    port: int = 5222
    plaintext: bool = False
    """Allow an unencrypted stream; honoured only when the server is on loopback."""
    ca_file: str | None = None
    """A CA (or self-signed certificate) to verify the server's TLS certificate with."""
    timeout: float = 5.0
    nodes: list[str] = field(default_factory=list)
    """Bare JIDs of the storage nodes to follow."""

    def __post_init__(self) -> None:
        if self.plaintext and not _is_loopback(self.host):
            raise ConfigError(
                f"plaintext connections are allowed on loopback only, not to {self.host}"
            )
        if self.timeout <= 0:
            raise ConfigError("connection.timeout must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> ConnectionSettings:
        connection = data.get("connection")
        if not isinstance(connection, dict):
            raise ConfigError("the config has no [connection] table")
        server = str(connection.get("server", "127.0.0.1:5222"))
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"connection.server must be HOST:PORT, not {server!r}")
        for name in ("jid", "password"):
            if not isinstance(connection.get(name), str) or not connection[name]:
                raise ConfigError(f"connection.{name} is missing")
        ca_file = connection.get("ca_file")
        if ca_file and base is not None:
            ca_file = str((base / ca_file).resolve())
        store = data.get("store", {})
        nodes = store.get("nodes", []) if isinstance(store, dict) else []
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise ConfigError("store.nodes must be a list of JIDs")
        try:
            timeout = float(connection.get("timeout", 5.0))
        except (TypeError, ValueError):
            raise ConfigError("connection.timeout must be a number") from None
        return cls(
            jid=connection["jid"],
            password=connection["password"],
            host=host.strip("[]"),
            port=int(port),
            plaintext=bool(connection.get("plaintext", False)),
            ca_file=ca_file,
            timeout=timeout,
            nodes=list(nodes),
        )

    def to_dict(self) -> dict[str, Any]:
        connection: dict[str, Any] = {
            "server": f"{self.host}:{self.port}",
            "jid": self.jid,
            "password": self.password,
            "plaintext": self.plaintext,
            "timeout": self.timeout,
        }
        if self.ca_file:
            connection["ca_file"] = self.ca_file
        return {"connection": connection, "store": {"nodes": list(self.nodes)}}


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file not readable: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_connection(path: str | os.PathLike[str] | None = None) -> ConnectionSettings:
    """Client settings from ``path``, or from the file named by ``$KV_CONFIG``."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no config: pass --config or set {CONFIG_ENV}")
    return ConnectionSettings.from_dict(read_toml(path), Path(path).parent)


@dataclass
class Limits:
    """What one request may carry; every limit is configurable per node."""

    max_value_bytes: int = 128 * 1024
    """Values are base64 in stanzas (4/3) and servers cap stanzas near 256 KiB."""
    max_key_bytes: int = keys.DEFAULT_LIMITS.max_bytes
    max_depth: int = keys.DEFAULT_LIMITS.max_depth
    max_page: int = 1000
    """Most items one answer carries; clients page for more."""
    max_list_page: int = 10_000
    """Most child names one list answer carries (names are small)."""
    max_stanza_bytes: int = 200_000
    """Budget for one answer's payload, below the server's stanza size limit."""
    max_txn_ops: int = 1000
    """Most steps and compares one transaction may hold."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_key_bytes <= 511:
            raise ConfigError("limits.max_key_bytes must be between 1 and 511 (LMDB's limit)")
        if self.max_value_bytes < 0 or self.max_value_bytes > 180_000:
            raise ConfigError("limits.max_value_bytes must be between 0 and 180000")
        if self.max_depth < 1 or self.max_page < 1 or self.max_list_page < 1:
            raise ConfigError("limits.max_depth, max_page and max_list_page must be positive")

    @property
    def key_limits(self) -> keys.KeyLimits:
        return keys.KeyLimits(self.max_key_bytes, self.max_depth)


@dataclass
class NodeConfig:
    """A storage node: its connection, its shards, its data and its limits."""

    connection: ConnectionSettings
    name: str
    data_dir: Path
    shards: list[str]
    cluster_shards: list[str]
    """Every shard prefix in the cluster, so the node can refuse keys a deeper shard owns."""
    limits: Limits = field(default_factory=Limits)
    map_size: int = 1 << 32
    retain_revisions: int = 100_000
    retain_seconds: float = 24 * 3600.0
    compact_interval: float = 60.0
    ephemeral_grace: float = 1.0
    """Seconds an ephemeral key outlives its writer's session (a reconnect within it keeps it)."""
    ping_interval: float = 4.0
    """Seconds between pings of the holders of ephemeral keys (XEP-0199)."""
    ping_timeout: float = 4.0
    """A holder that misses two pings in a row (each this long) loses its keys."""
    acl: AclSettings = field(default_factory=AclSettings)
    max_in_flight: int = 1000
    """Writes one JID may have queued at once; more are refused with limit-reached."""
    max_watches: int = 1000
    """Watches one JID may hold on this node."""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeConfig:
        data = read_toml(path)
        base = Path(path).parent
        connection = ConnectionSettings.from_dict(data, base)
        node = data.get("node")
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: no [node] table")
        shards = node.get("shards", ["/"])
        cluster = node.get("cluster_shards", shards)
        for prefix in [*shards, *cluster]:
            if not keys.is_valid(prefix, allow_root=True):
                raise ConfigError(f"{path}: {prefix!r} is not a valid shard prefix")
        if not set(shards) <= set(cluster):
            raise ConfigError(f"{path}: node.cluster_shards must include the node's own shards")
        if "data_dir" not in node:
            raise ConfigError(f"{path}: node.data_dir is missing")
        limits_table = dict(data.get("limits", {}))
        storage = data.get("storage", {})
        ephemeral = data.get("ephemeral", {})
        per_jid = {name: limits_table.pop(name) for name in ("max_in_flight", "max_watches")
                   if name in limits_table}
        try:
            limits = Limits(**limits_table)
        except TypeError as exc:
            raise ConfigError(f"{path}: [limits]: {exc}") from None
        limits_table = per_jid
        try:
            acl = AclSettings.from_dict(data.get("acl"))
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: [acl]: {exc}") from None
        return cls(
            connection=connection,
            name=str(node.get("name", connection.jid.split("@")[0])),
            data_dir=(base / node["data_dir"]).resolve(),
            shards=list(shards),
            cluster_shards=list(cluster),
            limits=limits,
            map_size=int(storage.get("map_size", 1 << 32)),
            retain_revisions=int(storage.get("retain_revisions", 100_000)),
            retain_seconds=float(storage.get("retain_seconds", 24 * 3600.0)),
            compact_interval=float(storage.get("compact_interval", 60.0)),
            ephemeral_grace=float(ephemeral.get("grace", 1.0)),
            ping_interval=float(ephemeral.get("ping_interval", 4.0)),
            ping_timeout=float(ephemeral.get("ping_timeout", 4.0)),
            acl=acl,
            max_in_flight=int(limits_table.get("max_in_flight", 1000)),
            max_watches=int(limits_table.get("max_watches", 1000)),
        )
