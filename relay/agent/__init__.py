"""The relay agent: dials out to a gateway and serves streams to targets it allows."""
from relay.agent.client import Agent, AgentAuthError, parse_host_port

__all__ = ["Agent", "AgentAuthError", "parse_host_port"]
