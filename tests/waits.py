"""Waiting, with a bound, for the store to do something on its own (expire, delete)."""

from __future__ import annotations

import asyncio
import time

from kvstore.client import Client
from protocol.errors import KeyNotFound


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
