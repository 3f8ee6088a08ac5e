"""Unit tests for kvstore.xmpp.Session's sending, with the socket faked."""

from __future__ import annotations

import asyncio

from slixmpp.xmlstream import ET

from kvstore.config import ConnectionSettings
from kvstore.xmpp import Inbound, Session


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
