"""The ``kv`` and ``kvstore`` commands with the agent commands added.

The store's own commands live in :mod:`kvstore.cli` and
:mod:`kvstore.server_cli`; this module adds the ones that need agents
(dependencies flow one way, so the composition happens here):

    kv discover RES...                       JIDs of the agents matching every RES
    kv call OP RES... [--arg K=V]... [--scope all|single] [--timeout S] [--json]
    kvstore agent --name NAME --provides RES [--provides RES]...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from agent.actor import Actor
from agent.agent import Agent
from agent.calls import Caller
from agent.registry import Registry
from kvstore import cli as kv_cli
from kvstore import server_cli
from kvstore.client import Client
from kvstore.config import CONFIG_ENV, ConfigError, ConnectionSettings, read_toml
from kvstore.devcluster import write_toml
from kvstore.xmpp import create_account

# --- kv discover / kv call ---------------------------------------------------


async def cmd_discover(kv: Client, args: argparse.Namespace) -> int:
    jids = await Registry(kv).discover(*args.resources)
    for jid in jids:
        if args.json:
            kv_cli._write_json({"jid": jid})
        else:
            kv_cli._write_line(jid)
    return kv_cli.EXIT_OK if jids else kv_cli.EXIT_NOT_FOUND


def _argument(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def _printable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


async def cmd_call(kv: Client, args: argparse.Namespace) -> int:
    caller = Caller(kv)
    failures = 0
    async for reply in caller.call(args.op, *args.resources, args=dict(args.arg or []),
                                   scope=args.scope, timeout=args.call_timeout):
        if reply.ok:
            line: dict[str, Any] = {"jid": reply.jid, "result": _printable(reply.result)}
        else:
            failures += 1
            line = {"jid": reply.jid, "error": str(reply.error),
                    "condition": reply.error.condition if reply.error else None}
        if args.json:
            kv_cli._write_json(line)
        elif reply.ok:
            kv_cli._write_line(f"{reply.jid}\t{json.dumps(line['result'], ensure_ascii=False)}")
        else:
            kv_cli._write_line(f"{reply.jid}\terror: {line['error']}")
        sys.stdout.flush()
    return kv_cli.EXIT_UNREACHABLE if failures else kv_cli.EXIT_OK


def build_kv_parser() -> argparse.ArgumentParser:
    parser = kv_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    discover = commands.add_parser("discover", help="agents providing resources")
    discover.add_argument("resources", nargs="*", metavar="RES")
    discover.add_argument("--json", action="store_true")
    discover.set_defaults(run=cmd_discover)

    call = commands.add_parser("call", help="run an operation on matching agents")
    call.add_argument("op")
    call.add_argument("resources", nargs="*", metavar="RES")
    call.add_argument("--arg", action="append", type=_argument, metavar="NAME=VALUE",
                      help="an argument; VALUE is JSON if it parses, else a string")
    call.add_argument("--scope", choices=("all", "single"), default="all")
    call.add_argument("--timeout", dest="call_timeout", type=float, default=5.0,
                      help="seconds to wait for replies (default 5)")
    call.add_argument("--json", action="store_true")
    call.set_defaults(run=cmd_call)
    return parser


def kv_main(argv: list[str] | None = None) -> int:
    return kv_cli.main(argv, parser=build_kv_parser())


# --- kvstore agent ---------------------------------------------------------


_AGENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def agent_settings(name: str, config: str | None) -> ConnectionSettings:
    """Settings for agent ``name``: its own account, created on first use if allowed.

    The credentials live next to the client config, in ``agents/NAME.toml``.
    """
    if not _AGENT_NAME.fullmatch(name):
        raise ConfigError(f"agent names are 1 to 64 of A-Z a-z 0-9 _ . -, not {name!r}")
    path = config or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no config: pass --config or set {CONFIG_ENV}")
    data = read_toml(path)
    base = ConnectionSettings.from_dict(data, Path(path).parent)
    credentials = Path(path).parent / "agents" / f"{name}.toml"
    if credentials.exists():
        return ConnectionSettings.from_dict(read_toml(credentials), Path(path).parent)
    if not data.get("agents", {}).get("register"):
        raise ConfigError(f"no account for agent {name}: create {credentials} "
                          f"(a [connection] table) or enable [agents] register")
    domain = base.jid.split("@", 1)[-1].split("/", 1)[0]
    settings = ConnectionSettings(
        jid=f"agent-{name}@{domain}", password=secrets.token_urlsafe(16), host=base.host,
        port=base.port, plaintext=base.plaintext, ca_file=base.ca_file, timeout=base.timeout,
        nodes=base.nodes)
    return settings


async def _run_agent(args: argparse.Namespace) -> int:
    settings = agent_settings(args.name, args.config)
    credentials = Path(args.config or os.environ[CONFIG_ENV]).parent / "agents" / \
        f"{args.name}.toml"
    if not credentials.exists():
        await create_account(settings)
        credentials.parent.mkdir(parents=True, exist_ok=True)
        write_toml(credentials, settings.to_dict())
        credentials.chmod(0o600)
    actors = [Actor(args.provides)] if args.provides else []
    agent = Agent(settings, name=args.name, actors=actors)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    for prefix in args.follow:
        view = await agent.config(prefix)
        view.add_listener(lambda event, name=args.name: print(
            f"config: {name} {event.type.value} {event.key}", flush=True))
    print(f"ready: {agent.jid} provides {' '.join(agent.resources)}", flush=True)
    try:
        await stop.wait()
    finally:
        await agent.stop()
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    server_cli._setup_logging(args.log_level)
    return asyncio.run(_run_agent(args))


def build_kvstore_parser() -> argparse.ArgumentParser:
    parser = server_cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    agent = commands.add_parser("agent", help="run an agent with the built-in /sys actor")
    agent.add_argument("--name", required=True)
    agent.add_argument("--provides", action="append", default=[], metavar="RES")
    agent.add_argument("--follow", action="append", default=[], metavar="PREFIX",
                       help="keep a live view of this subtree (shared configuration)")
    agent.add_argument("--config", help="client TOML config (default: $KV_CONFIG)")
    agent.add_argument("--log-level", default="info")
    agent.set_defaults(run=cmd_agent)
    return parser


def kvstore_main(argv: list[str] | None = None) -> int:
    return server_cli.main(argv, parser=build_kvstore_parser())

