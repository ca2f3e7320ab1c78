"""Run a test file's Triton launches under Triton's interpreter, in a worker process.

``TRITON_INTERPRET=1`` must be set before Triton is first imported (``triton.jit`` picks compile or
interpret at import), and the test session has imported it already, so each kernel test file runs
itself once as ``python FILE --interpret-worker OUT.pt`` and compares the saved results in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str | Path, out: str | Path, timeout: float = 600) -> Any:
    """Run ``script --interpret-worker out`` with ``TRITON_INTERPRET=1`` and return what it saved.

    Raises RuntimeError with the worker's output tails when it fails, so the failing launch is named.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--interpret-worker", str(out)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"interpreter worker {Path(script).name} failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out)
