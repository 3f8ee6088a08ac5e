"""Telling a hung holder of ephemeral keys from a busy server.

A crashed session's stream closes and the server reports it at once; a hung
one sends nothing and the server says nothing, so a storage node pings every
holder of ephemeral keys (XEP-0199) and takes silence for death. Silence is
evidence only if the server delivered the pings and their answers. While
500 agents logged in at once (each subscription rewriting the node's
roster), the server took up to 1.7 s to answer the node's own ping and
5.2 s to bring back an idle holder's answer; such a holder sends nothing
else that would prove it alive, and it lost its keys.

So each round pings the server itself too, after the holders. A server
handles the stanzas of one stream in order: its answer says the holders'
pings have left the node's stream, and from then each holder has
``timeout`` to answer (an error from a server without XEP-0199 is an answer
too). A round whose server ping goes unanswered within ``server_limit``
judges nobody. A holder is hung after two missed rounds in a row; an answer
that comes late (up to ``server_limit`` plus ``timeout``), or a request from
the holder since the ping was sent, proves it alive and resets the count.
Rounds never overlap, so a slow server is not sent more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from protocol.errors import KvError, Timeout, Unavailable

log = logging.getLogger(__name__)

SERVER_LIMIT = 30.0
"""Seconds a round waits for the server's own answer before it judges nobody."""
MISSES_FOR_HUNG = 2

SendPing = Callable[[str, float], Awaitable[Any]]
"""(full JID or server domain, timeout) -> awaitable answer; raises KvError (Timeout)."""


class HolderPings:
    """Ping rounds over the holders; ``on_silent(holder, reason)`` for each hung or gone one."""

    def __init__(self, send_ping: SendPing, *, server: str, timeout: float,
                 heard: Callable[[str], float], on_silent: Callable[[str, str], None],
                 online: Callable[[], bool] = lambda: True,
                 server_limit: float = SERVER_LIMIT) -> None:
        self.send_ping = send_ping
        self.server = server
        self.timeout = timeout
        self.server_limit = server_limit
        self.heard = heard
        """Holder -> when (time.monotonic()) its last request arrived, or -inf."""
        self.on_silent = on_silent
        self.online = online
        """Whether the node's own session is up (a lost one fails every ping)."""
        self.missed: dict[str, int] = {}
        """Holder -> rounds missed in a row."""

    def forget(self, holder: str) -> None:
        self.missed.pop(holder, None)

    async def round(self, holders: Iterable[str]) -> None:
        """Ping every holder, then the server; judge the holders once the server answered."""
        sent = time.monotonic()
        # Each holder's own timer only bounds the wait for an answer that may
        # still prove it alive; the round's verdict comes from the deadline below.
        waiting = {holder: asyncio.ensure_future(
            self.send_ping(holder, self.server_limit + self.timeout)) for holder in holders}
        if not waiting:
            return
        for holder, answer in waiting.items():
            answer.add_done_callback(lambda done, who=holder: self._answered(who, done))
        try:
            await self.send_ping(self.server, self.server_limit)
        except KvError as error:
            # A server without XEP-0199 answers with an error, which says as
            # well that it has handled the node's stream up to here; no answer,
            # or a session lost meanwhile, says nothing about the holders.
            if isinstance(error, Timeout) or not self.online():
                log.info("the server did not answer the node's own ping (%s): this round's "
                         "silences are not counted", error)
                return
        routed = time.monotonic()
        if routed - sent > self.timeout:
            log.info("the server took %.1f s to route the node's pings: its holders are "
                     "given %g s from then", routed - sent, self.timeout)
        await asyncio.wait(waiting.values(), timeout=self.timeout)
        for holder, answer in waiting.items():
            self._judge(holder, answer, sent)

    def _answered(self, holder: str, done: asyncio.Future[Any]) -> None:
        """Any answer proves life, however late (an error is an answer too)."""
        if not done.cancelled() and not isinstance(done.exception(), Unavailable):
            self.missed.pop(holder, None)

    def _judge(self, holder: str, answer: asyncio.Future[Any], sent: float) -> None:
        if answer.cancelled():
            return  # the node is stopping
        if answer.done():
            error = answer.exception()
            if not isinstance(error, Unavailable):
                return  # answered: _answered has cleared its misses
            if not isinstance(error, Timeout):
                # The server answered for the holder: its session is gone.
                self.missed.pop(holder, None)
                self.on_silent(holder, str(error))
                return
        if self.heard(holder) >= sent:
            # Its answer is stuck behind its own requests: busy, not hung.
            self.missed.pop(holder, None)
            return
        missed = self.missed.get(holder, 0) + 1
        if missed < MISSES_FOR_HUNG:
            self.missed[holder] = missed
            return
        self.missed.pop(holder, None)
        self.on_silent(holder, f"no answer from {holder} within {self.timeout:g}s of the "
                               f"server routing the ping, {missed} rounds in a row")
