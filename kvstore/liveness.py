"""The sessions holding ephemeral keys on a node, and when their keys go.

A crashed session's stream closes and the server reports it at once: its
keys go after a short grace period (:class:`Holders`; a reconnect within it
keeps them). A hung one sends nothing and the server says nothing, so the
node pings every holder (XEP-0199) and takes silence for death
(:class:`HolderPings`). Silence is
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
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from kvstore.storage import is_lease_owner
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


class Holders:
    """Who holds ephemeral keys here; each one's keys go when it is gone.

    ``delete_keys(owner)`` deletes a session's ephemeral keys and returns how
    many went. Leased keys are the lease's, not a session's: their owners
    (``lease:...``) are never held here.
    """

    def __init__(self, owners: Iterable[str], *,
                 delete_keys: Callable[[str], Awaitable[int]], send_ping: SendPing,
                 server: str, online: Callable[[], bool], grace: float,
                 ping_interval: float, ping_timeout: float) -> None:
        self.owners: set[str] = set()
        """Sessions (full JIDs) that hold ephemeral keys here."""
        for owner in owners:
            self.add(owner)
        self.delete_keys = delete_keys
        self.online = online
        self.grace = grace
        self.ping_interval = ping_interval
        self._expiring: dict[str, asyncio.TimerHandle] = {}
        """Sessions reported unavailable, each with the timer that expires it."""
        self._heard: dict[str, float] = {}
        """Holder -> when its last request arrived (monotonic): a request proves life."""
        self.pings = HolderPings(
            send_ping, server=server, timeout=ping_timeout, online=online,
            heard=lambda owner: self._heard.get(owner, -math.inf), on_silent=self._on_silent)

    def __contains__(self, owner: object) -> bool:
        return owner in self.owners

    def add(self, owner: str) -> None:
        if not is_lease_owner(owner):
            self.owners.add(owner)

    def heard(self, sender: str) -> None:
        """A request from ``sender`` arrived."""
        if sender in self.owners:
            self._heard[sender] = time.monotonic()

    def available(self, owner: str) -> None:
        timer = self._expiring.pop(owner, None)
        if timer is not None:
            timer.cancel()  # back within the grace period: its keys stay

    def unavailable(self, owner: str) -> None:
        if owner in self.owners and owner not in self._expiring:
            loop = asyncio.get_running_loop()
            self._expiring[owner] = loop.call_later(self.grace, self._expire_soon, owner)

    async def expire(self, owner: str) -> int:
        """Delete every ephemeral key of the session ``owner`` now; returns how many."""
        self.owners.discard(owner)
        self._heard.pop(owner, None)
        self.pings.forget(owner)
        timer = self._expiring.pop(owner, None)
        if timer is not None:
            timer.cancel()
        deleted = await self.delete_keys(owner)
        if deleted:
            log.info("%s is gone: deleted its %d ephemeral keys", owner, deleted)
        return deleted

    async def run(self) -> None:
        """Ping the holders until cancelled.

        A round starts every ``ping_interval``, as long as the last one is
        over: a server slow to route one round is not sent the next meanwhile.
        """
        while True:
            started = time.monotonic()
            if self.online():
                holders = [owner for owner in self.owners if owner not in self._expiring]
                if holders:
                    await self.pings.round(holders)
            await asyncio.sleep(max(0.0, started + self.ping_interval - time.monotonic()))

    def _expire_soon(self, owner: str) -> None:
        self._expiring.pop(owner, None)
        asyncio.ensure_future(self.expire(owner)).add_done_callback(_log_failure)

    def _on_silent(self, owner: str, reason: str) -> None:
        # A session lost meanwhile fails every ping in flight: that says nothing.
        if owner not in self.owners or owner in self._expiring or not self.online():
            return
        log.info("%s did not answer a ping (%s)", owner, reason)
        self._expire_soon(owner)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("expiring ephemeral keys failed", exc_info=task.exception())
