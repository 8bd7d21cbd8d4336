"""The gateway's web pages: the team dashboard, the per-tunnel request inspector and the
web terminal (its page's files in static/)."""
