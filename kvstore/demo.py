"""``make demo``: a two-shard dev cluster and a short scripted session with ``kv``.

Every step is a real ``kv`` command run against real processes (a private
Prosody, two storage nodes, ten ``kvstore agent`` processes); the demo prints
each command line and its output as a user would see them.
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
KVSTORE = str(Path(sys.executable).with_name("kvstore"))


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


def agents(cluster: DevCluster) -> None:
    env = {**os.environ, "KV_CONFIG": str(cluster.client_config)}
    run(env, "put", "/config/agents/loglevel", "info")
    print("# ten agents start, each registering the resources it provides")
    fleet = []
    for i in range(10):
        rack = f"/cluster/ey04/rack/{i % 3}"
        command = [KVSTORE, "agent", "--name", f"web{i}", "--provides", rack,
                   "--provides", f"/slice/{10 + i}", "--follow", "/config/agents",
                   "--log-level", "warning"]
        fleet.append(subprocess.Popen(command, stdout=subprocess.PIPE, env=env,
                                      start_new_session=True))
    try:
        for process in fleet:
            assert process.stdout is not None
            print(process.stdout.readline().decode().rstrip())
        print()
        print("# discovery is segment-wise and goes both ways")
        run(env, "discover", "/cluster/ey04/rack/1")
        run(env, "discover", "/cluster/ey04/rack/1/host/7")
        run(env, "discover", "/cluster/ey04", "/slice/13")
        run(env, "discover", "/cluster/ey040")
        print("# scatter/gather: one request and one answer per agent")
        run(env, "call", "ping", "/cluster/ey04/rack/2")
        run(env, "call", "info", "/slice/12", "--json")
        print("# a configuration change reaches every agent through its watch")
        run(env, "put", "/config/agents/loglevel", "debug")
        time.sleep(0.5)
        run(env, "call", "config", "/cluster/ey04")
        print("# an agent that dies leaves the registry at once")
        fleet[0].kill()
        fleet[0].wait()
        time.sleep(1.5)
        run(env, "discover", "/cluster/ey04/rack/0")
    finally:
        for process in fleet:
            if process.poll() is None:
                process.terminate()
        for process in fleet:
            process.wait(10)


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
        agents(cluster)
    finally:
        cluster.stop()
        print("stopped the cluster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
