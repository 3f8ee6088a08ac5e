"""``make demo``: a two-shard dev cluster and a short scripted session with ``kv``.

Every step is a real ``kv`` command run against real processes; the demo
prints each command line and its output as a user would see them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvstore.devcluster import DevCluster

KV = str(Path(sys.executable).with_name("kv"))


def run(env: dict[str, str], *args: str, stdin: bytes | None = None) -> str:
    shown = " ".join(args)
    print(f"$ kv {shown}" + (" < stdin" if stdin is not None else ""))
    done = subprocess.run([KV, *args], input=stdin, capture_output=True, env=env, timeout=30)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if output:
        print(output.rstrip("\n"))
    if done.returncode:
        print(f"(exit {done.returncode})")
    print()
    return output


def session(cluster: DevCluster) -> None:
    env = {**os.environ, "KV_CONFIG": str(cluster.client_config)}
    run(env, "put", "/cluster/ey04/slice/13", "running")
    run(env, "put", "/cluster/ey04/slice/14", "stopped")
    run(env, "put", "/config/db/primary", "10.0.0.5:5432")
    print("# values are bytes: anything goes in through stdin")
    run(env, "put", "/config/tls/key.der", stdin=bytes(range(256)))
    run(env, "get", "/cluster/ey04/slice/13")
    run(env, "ls", "/")
    run(env, "ls", "/cluster/ey04/slice")
    print("# /config lives on node2, the rest on node1; a prefix read gathers both")
    run(env, "get", "/", "--prefix", "--keys-only")
    run(env, "get", "/config/db/primary", "--json")
    print("# compare-and-swap: only if the version is still 1")
    run(env, "put", "/config/db/primary", "10.0.0.6:5432", "--if-version", "1")
    run(env, "put", "/config/db/primary", "10.0.0.7:5432", "--if-version", "1")
    print("# a watcher in the background sees the next two changes")
    watcher = subprocess.Popen([KV, "watch", "/cluster", "--prefix", "--count", "2"],
                               stdout=subprocess.PIPE, env=env)
    time.sleep(1.0)
    run(env, "put", "/cluster/ey04/slice/14", "running")
    run(env, "rm", "/cluster/ey04/slice/13")
    out, _ = watcher.communicate(timeout=30)
    print("$ kv watch /cluster --prefix --count 2")
    print(out.decode(errors="replace").rstrip("\n"))
    print()
    run(env, "get", "/nope")
    run(env, "status")


def main() -> int:
    folder = Path(".demo")
    if folder.exists():
        shutil.rmtree(folder)
    cluster = DevCluster(folder, shards=["/", "/config"], log_level="warning")
    print("starting a private Prosody and two storage nodes (/ and /config) ...")
    cluster.start()
    try:
        for node in cluster.nodes.values():
            print(f"node: {node.name} pid={node.pid} shard={','.join(node.shards)}")
        print(f"ready: KV_CONFIG={cluster.client_config}\n")
        session(cluster)
    finally:
        cluster.stop()
        print("stopped the cluster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
