"""Agents: actors that provide resources, found through the store's registry.

    from agent import Actor, Agent, Caller, operation
"""

from agent.actor import Actor, operation
from agent.agent import Agent
from agent.calls import Caller, NoProvider, Reply
from agent.registry import Registry
from agent.resources import matches

__all__ = ["Actor", "Agent", "Caller", "NoProvider", "Registry", "Reply", "matches", "operation"]
