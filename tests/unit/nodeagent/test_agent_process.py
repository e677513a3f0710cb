"""The agent process never loads the compiler: bcc and LLVM live in ``datapath.compiler``'s child only.

Loading bcc maps LLVM and clang, ~55 MB resident before anything is compiled,
which alone would break the agent's memory budget (< 150 MB with 100 endpoints).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

CHECK = """
import sys
import ciliary.nodeagent.main
from ciliary.nodeagent.datapath import compiling, engine, flows, libbpf, loading, maps
loaded = sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc."))
with open("/proc/self/maps") as f:
    mapped = f.read()
assert not loaded, loaded
assert "libLLVM" not in mapped and "libclang" not in mapped, "a compiler library is mapped"
"""


def test_the_agent_modules_import_neither_bcc_nor_llvm() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("operator", "nodeagent", "e2e"))}
    subprocess.run([sys.executable, "-c", CHECK], check=True, timeout=120, env=env)
