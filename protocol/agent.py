"""The agent wire format: one operation call, one answer.

A caller sends ``<call/>`` in an IQ set to an agent's full JID; the agent
answers with ``<call/>`` in the IQ result, or an error. Arguments and results
are msgpack (a map of arguments; any msgpack value back), base64 on the wire.
One request and one answer stanza per target: nothing else is exchanged.
"""

from __future__ import annotations

from typing import Any

import msgpack
from slixmpp.xmlstream import ElementBase

from protocol.errors import BadRequest, KvError, register_condition
from protocol.stanza import decode_value, encode_value

NS = "urn:x-kvstore:agent:1"


@register_condition
class UnknownOperation(KvError):
    """The agent has no operation of that name."""

    condition = "unknown-operation"
    namespace = NS
    xmpp_condition = "item-not-found"


@register_condition
class OperationFailed(KvError):
    """The operation ran and raised; the text says what went wrong."""

    condition = "operation-failed"
    namespace = NS
    xmpp_condition = "undefined-condition"


def pack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"not msgpack-able: {exc}") from None


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadRequest(f"payload is not valid msgpack: {exc}") from None


class Call(ElementBase):
    """``<call xmlns='urn:x-kvstore:agent:1' op='info'>base64(msgpack)</call>``."""

    name = "call"
    namespace = NS
    plugin_attrib = "agent_call"
    interfaces = {"op"}

    @property
    def op(self) -> str:
        return self.xml.get("op", "")

    @op.setter
    def op(self, name: str) -> None:
        self.xml.set("op", name)

    @property
    def payload(self) -> Any:
        return unpack(decode_value(self.xml.text))

    @payload.setter
    def payload(self, value: Any) -> None:
        self.xml.text = encode_value(pack(value))
