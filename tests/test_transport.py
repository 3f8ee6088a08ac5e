"""Transport security: SCRAM logins, TLS with a verified certificate, plaintext rules."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from kvstore.client import Client
from kvstore.config import ConfigError, ConnectionSettings
from kvstore.devcluster import DevCluster
from kvstore.testing.prosody import Prosody
from protocol.errors import Unavailable


async def test_a_tls_cluster_serves_clients_that_verify_its_certificate(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(shards=["/", "/b"], tls=True)
    settings = dev.settings()
    assert not settings.plaintext and settings.ca_file
    async with Client(settings) as kv:
        await kv.put("/b/x", b"over tls")
        assert (await kv.get("/b/x")).value == b"over tls"
        transport = kv.session.xmpp.transport
        assert transport is not None
        assert isinstance(transport.get_extra_info("ssl_object"), ssl.SSLObject)


async def test_a_client_refuses_a_certificate_it_cannot_verify(
        make_cluster: Callable[..., DevCluster], tmp_path: Path) -> None:
    dev = make_cluster(tls=True)
    stranger = Prosody(tmp_path / "other", tls=True)
    other_ca = stranger.make_certificate()  # a different self-signed certificate
    settings = dev.settings()
    settings.ca_file = str(other_ca)
    with pytest.raises(Unavailable, match="certificate"):
        await Client(settings, reconnect=False).connect(timeout=5)


async def test_plaintext_is_refused_by_a_tls_cluster(
        make_cluster: Callable[..., DevCluster]) -> None:
    dev = make_cluster(tls=True)
    settings = dev.settings()
    settings.plaintext, settings.ca_file = True, None
    with pytest.raises(Unavailable):
        await Client(settings, reconnect=False).connect(timeout=5)


def test_plaintext_needs_loopback_and_an_explicit_setting() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        ConnectionSettings(jid="a@example.org", password="x", host="192.0.2.10",
                           plaintext=True)
    assert ConnectionSettings(jid="a@example.org", password="x").plaintext is False
    data = {"connection": {"jid": "a@localhost", "password": "x", "server": "127.0.0.1:5222"}}
    assert ConnectionSettings.from_dict(data).plaintext is False


async def test_logins_use_scram(cluster: DevCluster) -> None:
    async with Client(cluster.settings()) as kv:
        mechanism = kv.session.xmpp.plugin["feature_mechanisms"].mech
        assert mechanism is not None and mechanism.name.startswith("SCRAM-")
    config = cluster.prosody.config_path.read_text()
    assert '"PLAIN"' in config.split("disable_sasl_mechanisms", 1)[1].splitlines()[0]
