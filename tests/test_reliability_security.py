"""Static checks over the shipped code (pipeline/, plugins/): no shell, no unsafe YAML, no eval.

"No shell ever runs with user-supplied strings": every subprocess gets an argument list, never
``shell=True``, ``os.system``, ``os.popen`` or ``subprocess.getoutput``. YAML is only
``safe_load``ed (the runtime check of a hostile tag is test_config.py::test_yaml_is_loaded_safely).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("pipeline", "plugins") for p in (ROOT / d).rglob("*.py"))

SUBPROCESS_CALLS = {"Popen", "run", "call", "check_call", "check_output"}
FORBIDDEN = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "spawnl"),
             ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
             ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"),
             ("pickle", "load"), ("pickle", "loads")}


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield node, (f.value.id, f.attr)
            elif isinstance(f, ast.Name):
                yield node, (None, f.id)


def test_sources_found():
    names = {str(p.relative_to(ROOT)) for p in SOURCES}
    assert len(SOURCES) > 20 and {"plugins/sinks/burnin/output.py", "pipeline/server.py", "pipeline/capture/relay.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_no_unsafe_loading(path):
    problems = []
    for node, (mod, name) in _calls(path):
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        if (mod, name) in FORBIDDEN:
            problems.append(f"{where}: {mod}.{name}")
        if mod is None and name in ("eval", "exec"):
            problems.append(f"{where}: {name}()")
        if name in SUBPROCESS_CALLS and mod in ("subprocess", None):
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    problems.append(f"{where}: shell=")
            if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)) and mod == "subprocess":
                problems.append(f"{where}: a command string instead of an argument list")
    assert not problems, problems
