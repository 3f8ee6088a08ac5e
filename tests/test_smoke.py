"""The shortest path through the whole system: a put and a get through Prosody."""

from kvstore.client import Client


async def test_put_then_get_round_trips_through_the_server(kv: Client, prefix: str) -> None:
    written = await kv.put(f"{prefix}/greeting", b"hello")
    item = await kv.get(f"{prefix}/greeting")
    assert item.value == b"hello"
    assert item.mod_rev == written.rev
    assert item.version == 1


async def test_nodes_answer_disco_info_with_the_kvstore_feature(kv: Client) -> None:
    from kvstore.xmpp import payload_of
    from protocol.stanza import NS

    node = kv.directory.owner("/")
    assert node is not None and node.jid is not None
    answer = await kv.session.request(kv.session.iq(
        node.jid, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>"))
    features = {f.get("var") for f in payload_of(answer)
                if f.tag == "{http://jabber.org/protocol/disco#info}feature"}
    assert NS in features
