"""``kvstore``: run the store's processes.

    kvstore serve --config node.toml       a storage node
    kvstore dev [--dir DIR] [--shard P]...  a private Prosody and one node per shard
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

from kvstore.config import ConfigError, NodeConfig
from protocol.errors import KvError

log = logging.getLogger("kvstore")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # slixmpp logs every stanza at DEBUG and chats at INFO.
    logging.getLogger("slixmpp").setLevel(max(logging.WARNING, logging.getLogger().level))


async def _serve(config: NodeConfig) -> int:
    from kvstore.node import StorageNode

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = StorageNode(config)
    delay = 0.2
    while True:
        try:
            await node.start()
            break
        except KvError as error:
            log.warning("cannot start yet: %s; retrying in %.1fs", error, delay)
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
                node.engine.close()
                return 0
            except TimeoutError:
                delay = min(delay * 2, 5.0)
    print(f"ready: {node.jid} shards={','.join(config.shards)}", flush=True)
    try:
        await stop.wait()
    finally:
        await node.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    # The commit thread needs the GIL for a moment between fsyncs; by default
    # it waits up to 5 ms for the busy event loop to let go, which capped the
    # node near 200 commits a second. Half a millisecond lifts that cap.
    sys.setswitchinterval(0.0005)
    config = NodeConfig.load(args.config)
    return asyncio.run(_serve(config))


def cmd_dev(args: argparse.Namespace) -> int:
    from kvstore.devcluster import DevCluster

    cluster = DevCluster(Path(args.dir), shards=args.shard or ["/"], port=args.port,
                         log_level=args.log_level, tls=args.tls)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    try:
        print(f"prosody: pid={cluster.prosody.pid} address={cluster.prosody.address}", flush=True)
        for node in cluster.nodes.values():
            print(f"node: {node.name} pid={node.pid} shard={','.join(node.shards)} "
                  f"config={node.config}", flush=True)
        print(f"ready: KV_CONFIG={cluster.client_config}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        cluster.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a storage node")
    serve.add_argument("--config", required=True, help="the node's TOML config")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=cmd_serve)

    dev = commands.add_parser("dev", help="run a development cluster in the foreground")
    dev.add_argument("--dir", default=".kvstore-dev", help="folder for all its files")
    dev.add_argument("--shard", action="append", metavar="PREFIX",
                     help="one storage node per shard prefix (default: one node owning /)")
    dev.add_argument("--port", type=int, help="the XMPP server's port (default: a free one)")
    dev.add_argument("--tls", action="store_true",
                     help="require TLS with a self-signed certificate that clients verify")
    dev.add_argument("--log-level", default="info")
    dev.set_defaults(run=cmd_dev)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"kvstore: {error}", file=sys.stderr)
        return 2
    except KvError as error:
        print(f"kvstore: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
