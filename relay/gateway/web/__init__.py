"""The gateway's web pages: the team dashboard and the per-tunnel request inspector."""
