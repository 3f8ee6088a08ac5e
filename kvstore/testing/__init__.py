"""Run a real XMPP server and a real cluster for tests, the demo and benchmarks."""

from kvstore.testing.prosody import Prosody, free_port

__all__ = ["Prosody", "free_port"]
