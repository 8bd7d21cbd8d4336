"""Every ``# type: ignore`` in relay/ names its error code and says why after it.

mypy itself refuses an ignore without a code (``ignore-without-code`` in pyproject.toml)
and one that silences nothing (``warn_unused_ignores``); the reason is this project's rule.
"""
from __future__ import annotations

import re
from pathlib import Path

import relay

RELAY_DIR = Path(relay.__file__).parent
IGNORE = re.compile(r"#\s*type:\s*ignore")
#: ``# type: ignore[code, code]  # why``
WELL_FORMED = re.compile(r"#\s*type:\s*ignore\[[a-z-]+(?:,\s*[a-z-]+)*\]\s+#\s*\S")


def _badly_formed(text: str) -> list[int]:
    return [n for n, line in enumerate(text.splitlines(), 1)
            if IGNORE.search(line) and not WELL_FORMED.search(line)]


def test_every_type_ignore_names_its_code_and_a_reason() -> None:
    sources = sorted(RELAY_DIR.rglob("*.py"))
    assert len(sources) > 40
    offenders = [f"{path.relative_to(RELAY_DIR)}:{n}" for path in sources for n in _badly_formed(path.read_text())]
    assert not offenders, offenders


def test_the_checker_catches_an_ignore_without_code_or_reason() -> None:
    text = ("x = f()  # type: ignore\n"
            "y = g()  # type: ignore[arg-type]\n"
            "z = h()  # type: ignore[arg-type, union-attr]  # h is typed too narrowly\n")
    assert _badly_formed(text) == [1, 2]
