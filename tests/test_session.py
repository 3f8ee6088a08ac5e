"""Unit tests for kvstore.xmpp.Session's sending, with the socket faked."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import pytest
from slixmpp.util.sasl.mechanisms import SCRAM
from slixmpp.xmlstream import ET

from kvstore.config import ConnectionSettings
from kvstore.xmpp import Inbound, Session, _scram_hi
from protocol.errors import Timeout, Unavailable


def request(iq_id: str) -> Inbound:
    xml = ET.fromstring(f"<iq xmlns='jabber:client' type='get' id='{iq_id}' "
                        f"from='someone@localhost/x'><ping xmlns='urn:xmpp:ping'/></iq>")
    return Inbound(xml, xml[0])


def offline_session(sent: list[str]) -> Session:
    session = Session(ConnectionSettings(jid="node@localhost", password="x",
                                         host="127.0.0.1", plaintext=True))
    session.xmpp.send_raw = sent.append  # type: ignore[method-assign]
    session.xmpp.transport = object()  # type: ignore[assignment]
    return session


async def test_answers_queued_before_send_together_leave_in_one_write() -> None:
    sent: list[str] = []
    session = offline_session(sent)
    loop = asyncio.get_running_loop()
    for iq_id in ("a", "b", "c"):
        loop.call_soon(session.reply, request(iq_id))
    session.send_together()
    session.send_together()  # a second call while holding changes nothing
    loop.call_soon(session.reply, request("late"))  # queued after the release
    assert sent == []
    await asyncio.sleep(0)
    assert len(sent) == 2
    together, late = sent
    assert [part.split("'")[3] for part in together.split("</iq>")[:-1]] == ["a", "b", "c"]
    assert together.count("to='someone@localhost/x'") == 3
    assert "id='late'" in late
    session.reply(request("now"))  # nothing held any more: sent at once
    assert len(sent) == 3 and "id='now'" in sent[2]


async def test_held_answers_are_dropped_quietly_if_the_connection_went() -> None:
    sent: list[str] = []
    session = offline_session(sent)
    loop = asyncio.get_running_loop()
    loop.call_soon(session.reply, request("a"))
    loop.call_soon(setattr, session.xmpp, "transport", None)  # disconnected meanwhile
    session.send_together()
    await asyncio.sleep(0)
    assert sent == []
    session.xmpp.transport = object()  # type: ignore[assignment]
    session.reply(request("b"))
    assert len(sent) == 1 and "id='b'" in sent[0]


def online_session(sent: list[str]) -> Session:
    session = offline_session(sent)
    session.online.set()
    return session


def answer(iq_id: str, kind: str = "result") -> ET.Element:
    return ET.fromstring(f"<iq xmlns='jabber:client' type='{kind}' id='{iq_id}' "
                         f"from='node@localhost/kvstore'/>")


def sent_id(text: str) -> str:
    return text.split("id='")[1].split("'")[0]


async def test_an_answer_settles_its_request_and_cancels_its_timer() -> None:
    sent: list[str] = []
    session = online_session(sent)
    future = session.send_iq(session.iq("node@localhost/kvstore", "get"), timeout=5.0)
    iq_id = sent_id(sent[0])
    timer = session._pending[iq_id][2]
    assert session._dispatch(answer(iq_id))
    assert future.done() and future.result().get("id") == iq_id
    assert session._pending == {} and timer.cancelled()
    assert not session._dispatch(answer(iq_id))  # a second answer is not ours any more


async def test_a_request_without_answer_times_out_and_is_forgotten() -> None:
    sent: list[str] = []
    session = online_session(sent)
    future = session.send_iq(session.iq("node@localhost/kvstore", "get"), timeout=0.05)
    try:
        await future
    except Timeout as error:
        assert "node@localhost/kvstore" in str(error)
    else:
        raise AssertionError("no Timeout")
    assert session._pending == {}
    assert not session._dispatch(answer(sent_id(sent[0])))  # too late: left to slixmpp


async def test_an_answer_to_a_request_its_caller_gave_up_on_is_dropped() -> None:
    sent: list[str] = []
    session = online_session(sent)
    future = session.send_iq(session.iq("node@localhost/kvstore", "get"), timeout=5.0)
    future.cancel()
    iq_id = sent_id(sent[0])
    timer = session._pending[iq_id][2]
    assert session._dispatch(answer(iq_id, "error"))
    assert session._pending == {} and timer.cancelled()


async def test_a_lost_connection_fails_every_request_and_cancels_their_timers() -> None:
    sent: list[str] = []
    session = online_session(sent)
    futures = [session.send_iq(session.iq("node@localhost/kvstore", "get"), timeout=5.0)
               for _ in range(3)]
    timers = [entry[2] for entry in session._pending.values()]
    session._fail_pending(Unavailable("lost the connection"))
    assert session._pending == {}
    assert all(timer.cancelled() for timer in timers)
    assert all(isinstance(future.exception(), Unavailable) for future in futures)


@pytest.mark.parametrize("digest", [hashlib.sha1, hashlib.sha256])
@pytest.mark.parametrize("password", ["pencil", "pässwörd", b"raw bytes"])
def test_scram_hi_is_rfc_5802s_definition(digest: Any, password: str | bytes) -> None:
    # Hi(str, salt, i) = U1 XOR U2 XOR ... XOR Ui, U1 = HMAC(str, salt + INT(1)),
    # Uk = HMAC(str, Uk-1); written out here as the RFC does.
    key = password.encode() if isinstance(password, str) else password
    salt, iterations = b"QSXCR+Q6sek8bf92", 4096
    u = hmac.new(key, salt + b"\0\0\0\1", digest).digest()
    expected = u
    for _ in range(iterations - 1):
        u = hmac.new(key, u, digest).digest()
        expected = bytes(a ^ b for a, b in zip(expected, u, strict=True))
    mechanism = SCRAM.__new__(SCRAM)
    mechanism.hash = digest
    assert SCRAM.Hi is _scram_hi
    assert SCRAM.Hi(mechanism, password, salt, iterations) == expected
