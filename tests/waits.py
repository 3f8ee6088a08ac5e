"""Waiting, with a bound, for the store to do something on its own (expire, recover)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kvstore.client import Client
from protocol.errors import KeyNotFound, Unavailable

T = TypeVar("T")


async def until_deleted(kv: Client, key: str, within: float, step: float = 0.05) -> float:
    """Seconds until ``key`` is gone; fails the test after ``within`` seconds."""
    started = time.monotonic()
    while True:
        try:
            await kv.get(key)
        except KeyNotFound:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"{key} still there after {within}s"
        await asyncio.sleep(step)


async def until_served(operation: Callable[[], Awaitable[T]], within: float,
                       what: str = "no recovery") -> T:
    """``operation``'s result once the store serves it again (it raises Unavailable
    until then); fails the test with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await operation()
        except Unavailable:
            assert time.monotonic() < deadline, f"{what} within {within}s"
            await asyncio.sleep(0.2)
