"""``kv``: the command-line client.

    kv put KEY [VALUE]      write (VALUE from stdin when omitted or -); prints the revision
    kv get KEY              print the value (--raw: exact bytes; --prefix; --json)
    kv ls KEY               print the names of KEY's children
    kv rm KEY               delete (--prefix: the whole subtree)
    kv watch KEY            print changes as they come (--prefix, --since, --count, --json)
    kv status               the storage nodes: online or not, shards, revisions
    kv acl show|grant|revoke|join|leave    access rules (admins only)

The connection comes from --config or $KV_CONFIG. Exit codes: 0 success;
1 not found or compare failed; 2 bad input; 3 store unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from kvstore import acl
from kvstore.client import Client, NodeStatus
from kvstore.config import ConfigError, load_connection
from protocol import keys
from protocol.errors import (
    BadRequest,
    Compacted,
    Forbidden,
    KeyNotFound,
    KvError,
    Unavailable,
    VersionMismatch,
)
from protocol.model import Event, KeyValue

EXIT_OK, EXIT_NOT_FOUND, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def exit_code(error: BaseException) -> int:
    if isinstance(error, KeyNotFound | VersionMismatch | Compacted):
        return EXIT_NOT_FOUND
    if isinstance(error, UsageError | BadRequest | ConfigError):
        return EXIT_BAD_INPUT
    if isinstance(error, Unavailable | Forbidden | KvError | OSError):
        return EXIT_UNREACHABLE
    return EXIT_UNREACHABLE


# --- output --------------------------------------------------------------


def _out() -> Any:
    return sys.stdout.buffer


def _text_or_none(value: bytes) -> str | None:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def kv_json(kv: KeyValue) -> dict[str, Any]:
    return {
        "key": kv.key,
        "value": _text_or_none(kv.value),
        "value_base64": base64.b64encode(kv.value).decode("ascii"),
        "version": kv.version,
        "create_rev": kv.create_rev,
        "mod_rev": kv.mod_rev,
    }


def event_json(event: Event) -> dict[str, Any]:
    line = {"type": event.type.value, **kv_json(event.kv), "shard": event.shard}
    if event.prev is not None:
        line["prev"] = kv_json(event.prev)
    return line


def _write_json(obj: Any) -> None:
    _out().write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")


def _write_line(data: bytes | str) -> None:
    _out().write((data.encode() if isinstance(data, str) else data) + b"\n")


# --- commands ------------------------------------------------------------


async def cmd_put(kv: Client, args: argparse.Namespace) -> int:
    if args.value is None or args.value == "-":
        value = sys.stdin.buffer.read()
    else:
        value = os.fsencode(args.value)
    result = await kv.put(args.key, value, if_version=args.if_version,
                          if_mod_rev=args.if_mod_rev, ephemeral=args.ephemeral)
    _write_line(str(result.rev))
    return EXIT_OK


async def cmd_get(kv: Client, args: argparse.Namespace) -> int:
    if args.prefix:
        found = (await kv.get_prefix(args.key, limit=args.limit, keys_only=args.keys_only)).items
        if not found:
            raise KeyNotFound(f"nothing under {args.key}")
    else:
        found = [await kv.get(args.key)]
    for item in found:
        if args.json:
            _write_json(kv_json(item))
        elif args.raw:
            _out().write(item.value)
        elif args.prefix:
            _write_line(item.key)
            if not args.keys_only:
                _write_line(item.value)
        else:
            _write_line(item.value)
    return EXIT_OK


async def cmd_ls(kv: Client, args: argparse.Namespace) -> int:
    result = await kv.list(args.key, limit=args.limit)
    for name in result.names:
        if args.json:
            _write_json({"name": name})
        else:
            _write_line(name)
    return EXIT_OK


async def cmd_rm(kv: Client, args: argparse.Namespace) -> int:
    result = await kv.delete(args.key, prefix=args.prefix, if_version=args.if_version)
    _write_line(str(result.deleted))
    if not result.deleted:
        raise KeyNotFound(f"nothing under {args.key}")
    return EXIT_OK


def _status_json(node: NodeStatus) -> dict[str, Any]:
    return {
        "jid": node.jid,
        "online": node.online,
        "shards": [
            {"prefix": s.prefix, "rev": s.rev, "compact_rev": s.compact_rev, "keys": s.keys}
            for s in node.shards
        ],
        "revision": max((s.rev for s in node.shards), default=0),
        "watchers": node.watchers,
        "uptime": node.uptime,
    }


async def cmd_status(kv: Client, args: argparse.Namespace) -> int:
    nodes = await kv.status()
    for node in nodes:
        if args.json:
            _write_json(_status_json(node))
            continue
        shards = " ".join(f"{s.prefix}@{s.rev}" for s in node.shards) or "-"
        state = "online" if node.online else "offline"
        _write_line(f"{node.jid}\t{state}\tshards={shards}\tkeys="
                    f"{sum(s.keys for s in node.shards)}")
    if not any(node.online for node in nodes):
        raise Unavailable("no storage node is online")
    return EXIT_OK


async def cmd_watch(kv: Client, args: argparse.Namespace) -> int:
    seen = 0
    if args.count is not None and args.count <= 0:
        return EXIT_OK
    stream = kv.watch(args.key, prefix=args.prefix, since=args.since, prev_kv=args.prev_kv)
    async for event in stream:
        if args.json:
            _write_json(event_json(event))
        elif event.type.value == "put":
            _write_line(f"put {event.key}")
            _write_line(event.kv.value)
        else:
            _write_line(f"delete {event.key}")
        sys.stdout.flush()
        seen += 1
        if args.count is not None and seen >= args.count:
            break
    return EXIT_OK


async def cmd_acl(kv: Client, args: argparse.Namespace) -> int:
    if args.acl == "show":
        entries = (await kv.get_prefix(acl.ACL_ROOT)).items
        policy = acl.Policy(acl.AclSettings(enabled=True))
        policy.update(entries)
        for rule in sorted(policy.rules, key=lambda r: (keys.tree_order(r.subtree), r.principal)):
            allow = sorted(rule.allow)
            if args.json:
                _write_json({"subtree": rule.subtree, "principal": rule.principal,
                             "allow": allow})
            else:
                _write_line(f"{rule.subtree}\t{rule.principal}\t{','.join(allow) or 'none'}")
        for group, members in sorted(policy.members.items()):
            for member in sorted(members):
                if args.json:
                    _write_json({"group": group, "member": member})
                else:
                    _write_line(f"group:{group}\t{member}")
        return EXIT_OK
    if args.acl == "grant":
        try:
            allow = [] if args.perms == "none" else sorted(
                acl.parse_permissions(args.perms.split(",")))
        except ValueError as error:
            raise BadRequest(str(error)) from None
        keys.validate(args.subtree, allow_root=True)
        result = await kv.put(acl.rule_key(args.subtree, args.principal),
                              json.dumps({"allow": allow}))
        _write_line(str(result.rev))
        return EXIT_OK
    if args.acl == "revoke":
        result = await kv.delete(acl.rule_key(args.subtree, args.principal))
        _write_line(str(result.deleted))
        return EXIT_OK
    if args.acl == "join":
        result = await kv.put(acl.group_key(args.group, args.jid), b"")
        _write_line(str(result.rev))
        return EXIT_OK
    result = await kv.delete(acl.group_key(args.group, args.jid))
    _write_line(str(result.deleted))
    return EXIT_OK


# --- parsing ---------------------------------------------------------------


def _non_negative(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {number}")
    return number


def _positive(text: str) -> int:
    number = _non_negative(text)
    if number == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kv", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="client TOML config (default: $KV_CONFIG)")
    parser.add_argument("--timeout", type=float, help="seconds to wait for each answer")
    parser.add_argument("--verbose", action="store_true", help="log protocol activity to stderr")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    put = commands.add_parser("put", help="write a key")
    put.add_argument("key")
    put.add_argument("value", nargs="?", help="the value (default: read stdin)")
    put.add_argument("--if-version", type=_non_negative, metavar="N",
                     help="only if the key's version is N (0: only if it does not exist)")
    put.add_argument("--if-mod-rev", type=_non_negative, metavar="REV",
                     help="only if the key was last changed at REV")
    put.add_argument("--ephemeral", action="store_true",
                     help="bind the key to this command's session: it is deleted once kv "
                          "exits (after the node's grace period)")
    put.set_defaults(run=cmd_put)

    get = commands.add_parser("get", help="read a key or a subtree")
    get.add_argument("key")
    get.add_argument("--prefix", action="store_true", help="the key and its whole subtree")
    get.add_argument("--raw", action="store_true", help="write exactly the value's bytes")
    get.add_argument("--json", action="store_true", help="JSON Lines, one object per key")
    get.add_argument("--limit", type=_positive, help="at most N keys (with --prefix)")
    get.add_argument("--keys-only", action="store_true", help="no values (with --prefix)")
    get.set_defaults(run=cmd_get)

    ls = commands.add_parser("ls", help="list the children of a key")
    ls.add_argument("key", nargs="?", default="/")
    ls.add_argument("--limit", type=_positive)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=cmd_ls)

    rm = commands.add_parser("rm", help="delete a key or a subtree")
    rm.add_argument("key")
    rm.add_argument("--prefix", action="store_true", help="the key and its whole subtree")
    rm.add_argument("--if-version", type=_non_negative, metavar="N")
    rm.set_defaults(run=cmd_rm)

    watch = commands.add_parser("watch", help="print changes as they happen")
    watch.add_argument("key")
    watch.add_argument("--prefix", action="store_true")
    watch.add_argument("--since", type=_positive, metavar="REV",
                       help="start at revision REV (inclusive) instead of now")
    watch.add_argument("--count", type=_non_negative, metavar="N", help="exit after N events")
    watch.add_argument("--prev-kv", action="store_true", help="include previous values (--json)")
    watch.add_argument("--json", action="store_true")
    watch.set_defaults(run=cmd_watch)

    rules = commands.add_parser("acl", help="show and change access rules (admins)")
    actions = rules.add_subparsers(dest="acl", required=True, parser_class=_Parser)
    show = actions.add_parser("show", help="every rule and group membership")
    show.add_argument("--json", action="store_true")
    grant = actions.add_parser("grant", help="set what a principal may do on a subtree")
    grant.add_argument("subtree")
    grant.add_argument("principal", help="a bare JID or group:NAME")
    grant.add_argument("perms", help="comma-separated read,write,watch, or none")
    revoke = actions.add_parser("revoke", help="remove a principal's rule on a subtree")
    revoke.add_argument("subtree")
    revoke.add_argument("principal")
    join = actions.add_parser("join", help="add a JID to a group")
    join.add_argument("group")
    join.add_argument("jid")
    leave = actions.add_parser("leave", help="remove a JID from a group")
    leave.add_argument("group")
    leave.add_argument("jid")
    rules.set_defaults(run=cmd_acl)

    status = commands.add_parser("status", help="the storage nodes and their shards")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)
    return parser


Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


async def _run(args: argparse.Namespace) -> int:
    settings = load_connection(args.config)
    if args.timeout is not None:
        if args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        settings.timeout = args.timeout
    client = Client(settings, reconnect=args.command == "watch")
    await client.connect()
    try:
        command: Command = args.run
        return await command(client, args)
    finally:
        await client.close()


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    try:
        args = (parser or build_parser()).parse_args(argv)
    except UsageError as error:
        print(f"kv: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        message = str(error) or type(error).__name__
        print(f"kv: {message.splitlines()[0] if message else 'error'}", file=sys.stderr)
        return exit_code(error)
