"""Every program in examples/ runs its ``--selftest`` as a subprocess and exits 0.

The subprocess inherits the environment, so the pure-Python run (RELAY_NO_EXTENSIONS=1)
runs the examples pure too.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: example -> (modules it needs beyond relay's dependencies, what its output must show)
CASES = {
    "mux_own_loop.py": ((), "echoed 1048576 bytes through one mux stream"),
    "embedded_gateway.py": ((), "stream to 127.0.0.1:"),
    "aiohttp_mount.py": (("aiohttp",), "routed GET -> 'hello aiohttp'"),
    "trio_host.py": (("trio", "trio_websocket"), "echoed 1048576 bytes through the agent's stream"),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_selftest(name):
    needs, expected = CASES[name]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    assert not missing, f"{name} needs {', '.join(missing)}: it is in the test extras; run scripts/bootstrap"
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--selftest"], capture_output=True,
                          text=True, timeout=90, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "selftest ok" in proc.stdout and expected in proc.stdout, proc.stdout
