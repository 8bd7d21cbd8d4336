"""relay/mux stays sans-IO: no event loops, sockets, selectors or clocks inside."""
from __future__ import annotations

import ast
from pathlib import Path

import relay.mux

FORBIDDEN = {"asyncio", "trio", "socket", "selectors", "time", "uvloop", "threading", "select", "ssl"}
MUX_DIR = Path(relay.mux.__file__).parent


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_mux_sources_import_nothing_io_or_clock_related() -> None:
    sources = (sorted(MUX_DIR.glob("*.py")) + sorted(MUX_DIR.glob("*.pxd"))
               + sorted((MUX_DIR.parent.parent / "ext").glob("_codec.p*")))
    assert len(sources) >= 7
    offenders = {str(p.name): sorted(_imported_roots(p) & FORBIDDEN) for p in sources if p.suffix == ".py"}
    assert not any(offenders.values()), offenders
    for pyx in (p for p in sources if p.suffix in (".pyx", ".pxd")):
        text = pyx.read_text()
        for name in FORBIDDEN:
            assert f"import {name}" not in text and f"from {name} " not in text, (pyx, name)


def test_the_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom asyncio import sleep\n")
    assert _imported_roots(bad) & FORBIDDEN == {"time", "asyncio"}
