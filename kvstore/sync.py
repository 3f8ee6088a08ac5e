"""A synchronous facade over :class:`kvstore.client.Client`, for scripts.

It runs the asyncio client on a private event loop in a background thread
and waits for each call, with the call's own timeout plus a small margin.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, TypeVar

from kvstore.client import (
    Client,
    DeleteResult,
    ListResult,
    NodeStatus,
    PutResult,
    RangeResult,
)
from kvstore.config import ConnectionSettings, load_connection
from protocol.errors import Timeout
from protocol.model import Event, KeyValue

T = TypeVar("T")
_END = object()


async def _cancel_the_rest() -> None:
    """Cancel whatever still runs on the loop (as asyncio.run does before closing)."""
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class SyncClient:
    """``with SyncClient.from_config() as kv: kv.put('/a', b'1')``."""

    def __init__(self, settings: ConnectionSettings, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstore-sync",
                                        daemon=True)
        self._thread.start()
        self.timeout = settings.timeout
        self._client: Client = self._run(self._make(settings, kwargs))
        try:
            self._run(self._client.connect())
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _make(settings: ConnectionSettings, kwargs: dict[str, Any]) -> Client:
        return Client(settings, **kwargs)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None,
                    **kwargs: Any) -> SyncClient:
        return cls(load_connection(path), **kwargs)

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        wait = (timeout or self.timeout) * 3 + 5
        try:
            return future.result(wait)
        except TimeoutError:
            future.cancel()
            raise Timeout(f"no answer within {wait:g}s") from None

    @property
    def client(self) -> Client:
        return self._client

    def get(self, key: str, **kwargs: Any) -> KeyValue:
        return self._run(self._client.get(key, **kwargs))

    def get_prefix(self, key: str, **kwargs: Any) -> RangeResult:
        return self._run(self._client.get_prefix(key, **kwargs))

    def list(self, key: str, **kwargs: Any) -> ListResult:
        return self._run(self._client.list(key, **kwargs))

    def put(self, key: str, value: bytes | str, **kwargs: Any) -> PutResult:
        return self._run(self._client.put(key, value, **kwargs))

    def delete(self, key: str, **kwargs: Any) -> DeleteResult:
        return self._run(self._client.delete(key, **kwargs))

    def status(self) -> list[NodeStatus]:
        return self._run(self._client.status())

    def watch(self, key: str, *, prefix: bool = False,
              since: int | Mapping[str, int] | None = None,
              prev_kv: bool = False) -> Iterator[Event]:
        """Events as a blocking iterator; closing the iterator cancels the watch."""
        events: queue.Queue[Any] = queue.Queue(maxsize=1000)
        stream = self._client.watch(key, prefix=prefix, since=since, prev_kv=prev_kv)
        self._run(stream.start())

        async def pump() -> None:
            try:
                async for event in stream:
                    await asyncio.to_thread(events.put, event)
            except BaseException as error:  # handed to the reading thread
                events.put(error)
            finally:
                events.put(_END)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()
            self._run(stream.close())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                self._run(client.close())
            except Exception:
                pass
        try:
            self._run(_cancel_the_rest())
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
