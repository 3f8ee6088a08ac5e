"""One XMPP session: connect, log in, send requests and match their answers.

Storage nodes, clients and agents each hold one :class:`Session`. It wraps a
slixmpp ``ClientXMPP`` and adds what slixmpp leaves to the application:

* requests with one handler for every answer and a table of futures keyed by
  stanza id (slixmpp's ``Iq.send`` registers a handler per pending request
  and matches every stanza against all of them, which collapses under load);
* a timeout on every wait, reported as :class:`~protocol.errors.Timeout`;
* a clear error when the server is down or refuses the credentials;
* reconnection with a short, capped back-off, and hooks that run after every
  (re)connection so the roles above can restore their state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from slixmpp import JID, ClientXMPP, Iq, Presence
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ET, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from kvstore.config import ConnectionSettings
from protocol import agent as agent_wire
from protocol import stanza as wire
from protocol.errors import KvError, Timeout, Unavailable

log = logging.getLogger(__name__)

CLIENT_NS = "jabber:client"
IQ_TAG = f"{{{CLIENT_NS}}}iq"
ERROR_TAG = f"{{{CLIENT_NS}}}error"

Hook = Callable[[], Awaitable[None] | None]

SCRAM_MECHANISMS = {"SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"}


class AuthenticationFailed(Unavailable):
    """The XMPP server refused the configured JID and password."""

    condition = "not-authorized"


def register_stanzas() -> None:
    """Teach slixmpp the kvstore payloads (idempotent)."""
    for request in wire.REQUESTS:
        register_stanza_plugin(Iq, request)
    register_stanza_plugin(Iq, agent_wire.Call)
    register_stanza_plugin(Presence, wire.Shards)


class _AnswerMatcher(MatcherBase):
    """Matches IQ results and errors whose id is one of ours: one dict lookup."""

    def __init__(self, pending: dict[str, Any]) -> None:
        super().__init__(None)
        self.pending = pending

    def match(self, stanza: Any) -> bool:
        xml = stanza.xml
        return (xml.tag == IQ_TAG and xml.get("type") in ("result", "error")
                and xml.get("id") in self.pending)


class Session:
    """One authenticated XMPP session, kept up until :meth:`close`."""

    def __init__(self, settings: ConnectionSettings, *, resource: str | None = None,
                 reconnect: bool = True, plugins: tuple[str, ...] = ()) -> None:
        self.settings = settings
        jid = JID(settings.jid)
        if not jid.resource:
            jid.resource = resource or f"kv-{secrets.token_hex(4)}"
        self.reconnect = reconnect
        self.xmpp = ClientXMPP(
            jid,
            settings.password,
            plugin_config={"feature_mechanisms": {
                # SCRAM only: the password never crosses the wire, even in TLS.
                "use_mechs": SCRAM_MECHANISMS,
                "unencrypted_scram": settings.plaintext,
            }},
        )
        self._configure_transport()
        for plugin in plugins:
            self.xmpp.register_plugin(plugin)
        register_stanzas()
        self.xmpp.auto_authorize = None  # subscription requests are the roles' decision
        self.xmpp.auto_subscribe = False

        self._pending: dict[str, tuple[asyncio.Future[Iq], str | None]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self.xmpp.register_handler(Callback("kv answers", _AnswerMatcher(self._pending),
                                            self._on_answer))
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("connection_failed", self._on_connection_failed)
        self.xmpp.add_event_handler("failed_all_auth", self._on_auth_failed)
        self.xmpp.add_event_handler("ssl_invalid_chain", self._on_bad_certificate)
        self.xmpp.add_event_handler("disconnected", self._on_disconnected)

        self.online = asyncio.Event()
        self.on_start: list[Hook] = []
        """Run after every successful login, first connection included."""
        self.on_stop: list[Callable[[], None]] = []
        """Run when a session ends, before any reconnection."""
        self._attempt: asyncio.Future[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def jid(self) -> JID:
        return self.xmpp.boundjid

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _configure_transport(self) -> None:
        xmpp = self.xmpp
        if self.settings.plaintext:
            xmpp.enable_plaintext = True
            xmpp.enable_starttls = False
            xmpp.enable_direct_tls = False
            return
        xmpp.enable_plaintext = False
        xmpp.enable_starttls = True
        xmpp.enable_direct_tls = False
        context = ssl.create_default_context(cafile=self.settings.ca_file)
        xmpp.ssl_context = context

    # --- connecting -------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Connect and log in; raise :class:`Unavailable` if that fails in time."""
        self._closing = False
        await self._connect_once(timeout or self.settings.timeout)

    async def _connect_once(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._attempt = loop.create_future()
        self.xmpp.connect(self.settings.host, self.settings.port)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._attempt)
        except TimeoutError:
            self._abandon_attempt()
            raise Unavailable(
                f"no XMPP session with {self.address} within {timeout:g}s"
            ) from None
        except KvError:
            self._abandon_attempt()
            raise
        finally:
            self._attempt = None

    def _abandon_attempt(self) -> None:
        self.xmpp.cancel_connection_attempt()
        self.xmpp.abort()

    def _settle(self, error: KvError | None = None) -> None:
        attempt = self._attempt
        if attempt is None or attempt.done():
            return
        if error is None:
            attempt.set_result(None)
        else:
            attempt.set_exception(error)

    async def _on_session_start(self, _event: Any) -> None:
        self.online.set()
        for hook in list(self.on_start):
            try:
                result = hook()
                if result is not None:
                    await result
            except Exception:
                log.exception("session start hook failed")
        self._settle()

    def _on_connection_failed(self, error: Any) -> None:
        # Stop slixmpp's own retry loop (its back-off grows to minutes); the
        # reconnector below retries on a short, capped schedule instead.
        self.xmpp.cancel_connection_attempt()
        self._settle(Unavailable(f"cannot reach the XMPP server at {self.address}: {error}"))

    def _on_bad_certificate(self, error: Any) -> None:
        self._settle(Unavailable(
            f"the TLS certificate of {self.address} failed verification: {error}"))
        self.xmpp.abort()

    def _on_auth_failed(self, _event: Any) -> None:
        self._settle(AuthenticationFailed(
            f"the XMPP server at {self.address} refused the login of {self.settings.jid}"
        ))

    def _on_disconnected(self, reason: Any) -> None:
        was_online = self.online.is_set()
        self.online.clear()
        if self._attempt is not None:
            # A failed TLS handshake closes the connection a moment before it
            # raises; give that more telling error the chance to come first.
            asyncio.get_running_loop().call_later(0.1, self._settle, Unavailable(
                f"the XMPP server at {self.address} closed the connection"))
        self._fail_pending(Unavailable(f"lost the connection to {self.address}"))
        if was_online:
            for hook in list(self.on_stop):
                try:
                    hook()
                except Exception:
                    log.exception("session stop hook failed")
        if was_online and self.reconnect and not self._closing:
            self._reconnector = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = 0.1
        while not self._closing and not self.online.is_set():
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self._connect_once(self.settings.timeout)
                log.info("reconnected to %s as %s", self.address, self.jid)
                return
            except KvError as error:
                log.info("reconnect failed: %s", error)
            delay = min(delay * 2, 2.0)

    async def wait_online(self, timeout: float) -> None:
        if self.online.is_set():
            return
        if self._closing:
            raise Unavailable("the session is closed")
        try:
            async with asyncio.timeout(timeout):
                await self.online.wait()
        except TimeoutError:
            raise Unavailable(
                f"not connected to the XMPP server at {self.address} (waited {timeout:g}s)"
            ) from None

    async def close(self) -> None:
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
        self._fail_pending(Unavailable("the session was closed"))
        if self.xmpp.transport is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self.xmpp.disconnect(wait=1.0)
            except (TimeoutError, Exception):
                self.xmpp.abort()
        self.xmpp.cancel_connection_attempt()
        self.online.clear()
        # slixmpp leaves its send loop running after a disconnect; end it so
        # that closing the event loop finds nothing pending.
        sender = getattr(self.xmpp, "_run_out_filters", None)
        if sender is not None and not sender.done():
            sender.cancel()

    # --- requests -------------------------------------------------------

    def new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def iq(self, to: str | JID, type_: str, payload: ET.Element | None = None) -> Iq:
        iq = self.xmpp.Iq()
        iq["to"] = to
        iq["type"] = type_
        if payload is not None:
            iq.xml.append(payload)
        return iq

    async def request(self, iq: Iq, timeout: float | None = None) -> Iq:
        """Send ``iq`` and return its result; raise the error it got, or Timeout."""
        timeout = timeout or self.settings.timeout
        if not self.online.is_set():
            await self.wait_online(timeout)
        return await self.send_iq(iq, timeout)

    def send_iq(self, iq: Iq, timeout: float) -> asyncio.Future[Iq]:
        """Send ``iq`` now; the future gets its result, its error, or Timeout."""
        iq_id = self.new_id()
        iq.xml.set("id", iq_id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Iq] = loop.create_future()
        to = iq.xml.get("to")
        if not self.online.is_set():
            future.set_exception(Unavailable(f"not connected to {self.address}"))
            return future
        self._pending[iq_id] = (future, to)
        timer = loop.call_later(timeout, _expire, future, to, timeout)

        def settled(_: asyncio.Future[Iq]) -> None:
            timer.cancel()
            self._pending.pop(iq_id, None)

        future.add_done_callback(settled)
        self.xmpp.send(iq)
        return future

    def _on_answer(self, stanza: Iq) -> None:
        xml = stanza.xml
        entry = self._pending.get(xml.get("id", ""))
        if entry is None:
            return
        future, expected = entry
        if expected is not None and JID(xml.get("from", "")) != JID(expected):
            log.warning("dropping an answer to %s from %s, sent to %s",
                        xml.get("id"), xml.get("from"), expected)
            return
        self._pending.pop(xml.get("id", ""), None)
        if future.done():
            return
        if xml.get("type") == "result":
            future.set_result(stanza)
        else:
            future.set_exception(wire.parse_error(xml.find(ERROR_TAG)))

    def _fail_pending(self, error: KvError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for future, _ in pending:
            if not future.done():
                future.set_exception(type(error)(str(error)))

    def send(self, stanza: Any) -> None:
        self.xmpp.send(stanza)


async def create_account(settings: ConnectionSettings, timeout: float = 10.0) -> bool:
    """Create ``settings.jid`` with its password by in-band registration (XEP-0077).

    Returns True if the account was created, False if it already existed (and
    the password works). Raises Unavailable if the server is down or refuses.
    """
    session = Session(settings, reconnect=False, plugins=("xep_0077",))
    xmpp = session.xmpp
    xmpp["xep_0077"].force_registration = True
    created: list[bool] = []

    async def register(_form: Any) -> None:
        request = xmpp.Iq()
        request["type"] = "set"
        request["register"]["username"] = xmpp.boundjid.user
        request["register"]["password"] = settings.password
        try:
            await request.send(timeout=timeout)
            created.append(True)
        except IqError as error:
            if error.condition != "conflict":
                log.warning("registration of %s refused: %s", settings.jid, error.condition)

    xmpp.add_event_handler("register", register)
    try:
        await session.start(timeout)
    finally:
        await session.close()
    return bool(created)


def _expire(future: asyncio.Future[Any], to: str | None, timeout: float) -> None:
    if not future.done():
        future.set_exception(Timeout(f"no answer from {to or 'the server'} within {timeout:g}s"))


def answer(iq: Iq, payload: ET.Element | None = None, type_: str = "result") -> Iq:
    """A fresh answer to ``iq`` (cheaper than ``iq.reply()``, which deep-copies it)."""
    reply = Iq(iq.stream)
    xml = reply.xml
    xml.set("type", type_)
    xml.set("id", iq.xml.get("id", ""))
    sender = iq.xml.get("from")
    if sender:
        xml.set("to", sender)
    if payload is not None:
        xml.append(payload)
    return reply


def reply_error(iq: Iq, error: KvError) -> Iq:
    """An error answer to ``iq``: the XMPP condition plus the kvstore one."""
    reply = answer(iq, type_="error")
    # Built by hand: slixmpp's Error stanza only accepts the conditions it
    # knows, and silently sends another one for the rest (policy-violation).
    element = ET.SubElement(reply.xml, ERROR_TAG, {"type": error.xmpp_type})
    ET.SubElement(element, f"{{{wire.STANZAS_NS}}}{error.xmpp_condition}")
    text = ET.SubElement(element, f"{{{wire.STANZAS_NS}}}text")
    text.text = str(error)[:1000]
    element.append(wire.error_condition(error))
    return reply
