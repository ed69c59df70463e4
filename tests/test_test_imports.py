"""Every ``from gla... import name`` in the tests names something that exists.

The GPU-only test modules skip before their imports on a CPU machine, so a renamed function would break them only
on the GPU (tests/ops/test_cuda_graphs.py once imported a helper that had been renamed). This check reads their
imports without running them."""
import ast
import importlib
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def _gla_imports():
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gla":
                for alias in node.names:
                    yield path.relative_to(TESTS.parent).as_posix(), node.module, alias.name


@pytest.mark.parametrize("where,module,name", list(_gla_imports()))
def test_imported_name_exists(where, module, name):
    mod = importlib.import_module(module)
    if not hasattr(mod, name):  # a submodule imported by name
        importlib.import_module(f"{module}.{name}")
