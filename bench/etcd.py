"""The peer users would pick instead: etcd, run privately on loopback.

:class:`EtcdServer` starts Debian's ``etcd`` (``apt-get install etcd-server``)
as a single-member cluster on 127.0.0.1 with free client and peer ports and a
data folder of its own, and stops it again (it also dies with this process,
through ``PR_SET_PDEATHSIG``). :class:`EtcdLoad` makes the requests with the
``etcd3`` Python client from PyPI (synchronous, over gRPC; it needs
``protobuf<4``); :mod:`bench.etcd_driver` runs it in a process of its own,
with K threads for K requests in flight
(:func:`bench.load.threaded_closed_loop`).

If the binary or the client is missing, :func:`availability` says so and the
benchmark skips the etcd figures instead of failing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from kvstore.testing.process import stop_process
from kvstore.testing.prosody import free_port

DEBIAN_BINARY = "/usr/bin/etcd"
_PR_SET_PDEATHSIG = 1


class EtcdError(Exception):
    """etcd did not start, or a request to it failed."""


@dataclass(frozen=True)
class Availability:
    """Whether the etcd figures can be measured, and if not, why."""

    binary: str | None
    client: ModuleType | None
    version: str
    reason: str
    """Empty when both the server and the client are there."""

    @property
    def ok(self) -> bool:
        return self.binary is not None and self.client is not None


def _server_version(binary: str) -> str:
    # `etcd --version` only prints; it starts nothing.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run([binary, "--version"], capture_output=True, text=True,
                               timeout=10)
        for line in found.stdout.splitlines():
            if line.startswith("etcd Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def availability() -> Availability:
    """Look for the ``etcd`` binary and the ``etcd3`` client; never raises."""
    binary = shutil.which("etcd") or (DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK)
                                      else None)
    reasons = []
    if binary is None:
        reasons.append("no etcd binary (install Debian's etcd-server: "
                       "apt-get install -y etcd-server)")
    client: ModuleType | None = None
    try:
        import etcd3  # optional: only the bench extra installs it

        client = etcd3
    except Exception as error:  # ImportError, or protobuf>=4's TypeError
        reasons.append(f"the etcd3 client cannot be imported ({type(error).__name__}: "
                       f"{error}); install the bench extra: pip install -e '.[bench]'")
    version = _server_version(binary) if binary else "missing"
    return Availability(binary, client, version, "; ".join(reasons))


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark process dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EtcdServer:
    """One etcd member on loopback, with a private data folder; ``start()`` then ``stop()``."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.client_port = 0
        self.peer_port = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name", "bench",
            "--data-dir", str(self.folder / "data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}",
            "--initial-cluster-token", f"kvbench-{os.getpid()}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-level", "warn",
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        # Debian's /etc/default/etcd is for the system service; ignore any ETCD_* setting.
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("ETCD")}
        with open(self.folder / "etcd.log", "ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=env, cwd=self.folder, start_new_session=True,
                preexec_fn=_die_with_parent,  # before any thread of ours runs
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise EtcdError(f"etcd did not become healthy within {timeout:g}s; "
                        f"see {self.folder / 'etcd.log'}")

    def _healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.client_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                return json.loads(answer.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout)


class EtcdLoad:
    """The benchmark's requests to etcd, each bounded by the client's timeout.

    One client (one gRPC channel) is shared by every thread, as one
    :class:`kvstore.Client` session is shared by every request in flight.
    """

    def __init__(self, module: ModuleType, port: int, timeout: float = 5.0) -> None:
        self.client = module.client(host="127.0.0.1", port=port, timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def get(self, key: str) -> bytes:
        value, _ = self.client.get(key)
        if value is None:
            raise EtcdError(f"{key} not found")
        return value

    def put(self, key: str, value: bytes) -> None:
        self.client.put(key, value)

    def get_prefix(self, prefix: str, expected: int) -> int:
        """Read every key below ``prefix`` (values included); check how many came."""
        found = sum(1 for _ in self.client.get_prefix(prefix))
        if found != expected:
            raise EtcdError(f"{prefix}: {found} keys, expected {expected}")
        return found

    def puts(self, keys: list[str], value: bytes) -> list[Any]:
        """Prepared put operations for :meth:`txn` (built once, like the store's Put list)."""
        return [self.client.transactions.put(key, value) for key in keys]

    def txn(self, operations: list[Any]) -> None:
        """One transaction of many puts (etcd allows 128 operations by default)."""
        succeeded, _ = self.client.transaction(compare=[], success=operations, failure=[])
        if not succeeded:
            raise EtcdError("a transaction without compares did not succeed")

    def populate(self, keys: list[str], value: bytes, per_txn: int = 100) -> None:
        for start in range(0, len(keys), per_txn):
            self.txn(self.puts(keys[start:start + per_txn], value))
