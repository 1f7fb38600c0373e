"""Run a test file's check under Triton's CPU interpreter.

The interpreter must be chosen before ``triton`` is first imported (``TRITON_INTERPRET=1``; set later, its
``tl.zeros`` is not patched), so each check runs in a fresh Python with it set."""

from __future__ import annotations

import os
import subprocess
import sys


def interpreted(path: str, check: str, *args) -> None:
    """Run the function ``check(*args)`` of the file at ``path`` in a fresh Python under Triton's interpreter; fails
    with the child's stderr if it does."""
    here = os.path.dirname(os.path.abspath(path))  # the test file imports its helpers (this module) from there
    code = f"import runpy, sys; sys.path.insert(0, {here!r}); runpy.run_path({path!r})[{check!r}](*{args!r})"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
