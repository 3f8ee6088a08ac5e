"""The actor every agent runs: ``/sys``, with operations about the agent itself."""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from agent.actor import Actor, operation

if TYPE_CHECKING:
    from agent.agent import Agent


class SysActor(Actor):
    resources = ("/sys",)

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self.started = time.time()

    @operation
    def info(self) -> dict[str, Any]:
        """Host facts: hostname, platform, uptime, load average."""
        try:
            load = list(os.getloadavg())
        except OSError:
            load = []
        return {
            "jid": self.agent.jid,
            "name": self.agent.name,
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "loadavg": load,
        }

    @operation
    def describe(self) -> dict[str, Any]:
        """The resources this agent provides and the operations it answers."""
        return {
            "resources": self.agent.resources,
            "operations": sorted(self.agent.operations),
        }

    @operation
    def ping(self) -> str:
        return "pong"

    @operation
    def config(self) -> dict[str, dict[str, bytes]]:
        """The shared configuration this agent follows, as it sees it now."""
        return {view.prefix: view.relative() for view in self.agent.views}
