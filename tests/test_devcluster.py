"""``kvstore dev``: what it prints, what it starts, and that a signal stops it all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.config import load_connection

KVSTORE = str(Path(sys.executable).with_name("kvstore"))
KV = str(Path(sys.executable).with_name("kv"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; its parent reaps it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dev_cluster_prints_its_parts_serves_and_stops_within_five_seconds(
        tmp_path: Path, sig: signal.Signals) -> None:
    process = subprocess.Popen(
        [KVSTORE, "dev", "--dir", str(tmp_path / "dev"), "--shard", "/", "--shard", "/a",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("ready:"):
            break
    try:
        nodes = [re.fullmatch(r"node: (\S+) pid=(\d+) shard=(\S+) config=(\S+)", line)
                 for line in lines if line.startswith("node:")]
        assert [(m.group(1), m.group(3)) for m in nodes if m] == [("node1", "/"), ("node2", "/a")]
        ready = lines[-1]
        assert ready == f"ready: KV_CONFIG={tmp_path / 'dev' / 'client.toml'}"
        prosody_pid = int(re.search(r"pid=(\d+)", lines[0]).group(1))  # type: ignore[union-attr]
        pids = [prosody_pid] + [int(m.group(2)) for m in nodes if m]
        assert all(_alive(pid) for pid in pids)
        settings = load_connection(tmp_path / "dev" / "client.toml")
        assert settings.host == "127.0.0.1" and settings.plaintext

        env = {**os.environ, "KV_CONFIG": str(tmp_path / "dev" / "client.toml")}
        put = subprocess.run([KV, "put", "/a/x", "hello"], env=env, capture_output=True,
                             timeout=30)
        assert put.returncode == 0, put.stderr
        assert subprocess.run([KV, "get", "/a/x"], env=env, capture_output=True,
                              timeout=30).stdout == b"hello\n"

        started = time.monotonic()
        process.send_signal(sig)
        process.wait(10)
        assert time.monotonic() - started < 5
        assert process.returncode == 0
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
