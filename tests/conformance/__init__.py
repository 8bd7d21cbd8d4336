"""One conformance suite run on every agent/gateway pairing (asyncio and trio)."""
