"""Running a part of the benchmark: an event loop, signals, and stopping what was started.

Ctrl-C and SIGTERM never leave a server behind: outside the event loop a
signal raises :class:`Interrupted` at once; inside, it cancels the running
coroutine so every ``finally`` runs (clients log out); then
:class:`Processes` stops every process the part started, in reverse order,
immune to a second Ctrl-C while it does so.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def progress(message: str) -> None:
    """A line on stderr (stdout holds only the results)."""
    print(message, file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def install_signal_handlers() -> None:
    """Raise Interrupted on SIGINT and SIGTERM, even if a shell made us ignore SIGINT."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)


def run_async(main: Coroutine[Any, Any, T], cleanup_timeout: float = 10.0) -> T:
    """Run ``main`` on a fresh event loop; Ctrl-C or SIGTERM cancel it cleanly.

    Inside the loop a signal only cancels the main task, so every ``finally``
    runs; tasks still left then get ``cleanup_timeout`` seconds to end before
    the loop is closed regardless. Raises Interrupted if a signal ended the run.
    """
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if signalled:
            raise Interrupted(f"signal {signalled[0]}") from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        install_signal_handlers()
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for leftover in left:
            leftover.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=cleanup_timeout))
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


async def guarded(name: str, measurement: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The measurement's figures, or ``{"error": ...}`` if it failed.

    One broken measurement (the store is being changed while it is measured)
    then costs only its own figures, not the whole part's.
    """
    try:
        return await measurement
    except Exception as error:
        traceback.print_exc()
        progress(f"{name}: FAILED: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}


class Processes:
    """Every process one part started; leaving the ``with`` block stops them all.

    Register each process as soon as it is being started (``add(stop)``):
    its stop function must be safe to call if the start failed half-way.
    """

    def __init__(self) -> None:
        self._stops: list[tuple[str, Callable[[], None]]] = []

    def add(self, name: str, stop: Callable[[], None]) -> None:
        self._stops.append((name, stop))

    def close(self) -> None:
        previous = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self._stops:
                name, stop = self._stops.pop()
                try:
                    stop()
                except Exception as error:
                    progress(f"warning: stopping {name} failed: {type(error).__name__}: {error}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
