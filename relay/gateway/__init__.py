"""The relay gateway: agent endpoint, control API, tunnels, and its persistent state."""
