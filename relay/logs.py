"""Logging set-up of the long-running commands: text or JSON lines on stderr, secrets
redacted.

``--log-format text`` (the default) is ``TIME LEVEL LOGGER: MESSAGE``; ``--log-format
json`` is one JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message``, plus the fields a record carries in ``record.access`` (the gateway's
access log, relay.gateway.http.traffic) and ``exception`` when there is one.

Whatever the format, every line goes through :func:`redact` first: team keys
(``sk-``/``dk-``/``ak-``), the access tokens of tunnel and share URLs, an ``admin_token=`` query and bearer
credentials are replaced by ``<redacted>``, so a message that quotes a URL or a header
cannot leak one. (The gateway prints the default team's keys once on stdout, on purpose;
that is not logging.)
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "redact", "setup_logging"]

LOG_FORMATS = ("text", "json")

_SECRETS = [
    (re.compile(r"\b(sk|dk|ak)-[A-Za-z0-9_-]{16,}"), r"\1-<redacted>"),
    (re.compile(r"(/(?:tunnel|s)/)[A-Za-z0-9_-]{20,}"), r"\1<redacted>"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{16,}"), r"\1<redacted>"),
    (re.compile(r"\bwhsec_[A-Za-z0-9_-]{16,}"), "whsec_<redacted>"),
    (re.compile(r"(?i)\b(admin_token=)[^&\s\"']+"), r"\1<redacted>"),  # the web terminal's query form
]


def redact(text: str) -> str:
    """``text`` with the secrets relay makes replaced by ``<redacted>``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class TextFormatter(logging.Formatter):
    """The text format, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            for key, value in access.items():
                entry.setdefault(key, redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log at ``level`` to stderr in ``fmt`` (one of :data:`LOG_FORMATS`), replacing any
    handler set up before (a command runs this once)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
