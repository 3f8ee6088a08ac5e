"""The shortest path through the whole system: a put and a get through Prosody."""

from kvstore.client import Client


async def test_put_then_get_round_trips_through_the_server(kv: Client, prefix: str) -> None:
    written = await kv.put(f"{prefix}/greeting", b"hello")
    item = await kv.get(f"{prefix}/greeting")
    assert item.value == b"hello"
    assert item.mod_rev == written.rev
    assert item.version == 1
